"""Projection speed, side by side in one run: bare forward, raypipe's projector, and the
common ways (all hidden states to the host; batch size 1 with a host sync per hooked layer).

The common ways run in a second process without raypipe's allocator settings, as a user's own
script would (`--same-process`: here, with them); raypipe's candidates run here."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from common import Elsewhere, Rounds, emit, load, parser, token_batches

from raypipe.engine import hostmem
from raypipe.engine.hooks import decoder_stack, forward_hooks, pad_right
from raypipe.engine.projector import Projector


def arguments():
    p = parser(__doc__)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--min-len", type=int, default=60)
    p.add_argument("--max-len", type=int, default=160)
    p.add_argument("--traits", type=int, default=6)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument(
        "--same-process",
        action="store_true",
        help="run the common ways in this process too (with raypipe's allocator settings)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time the projector with --compile-prefill (torch.compile'd decoder blocks)",
    )
    args = p.parse_args()
    # The allocator settings only touch host memory; on a GPU a second copy of the model would
    # only cost device memory.
    args.same_process = args.same_process or args.device != "cpu"
    return args


def prepare(args) -> SimpleNamespace:
    """The model, prompts, vectors and batches: built alike in both processes."""
    model, pad = load(args)
    stack = decoder_stack(model)
    n_layers, hidden = len(stack.layers), stack.embed_tokens.weight.shape[1]
    vocab = stack.embed_tokens.weight.shape[0]
    seqs = token_batches(args.prompts, args.min_len, args.max_len, vocab)
    # Default `--layers best,best+5` with best near the middle: hooks at two layers per trait.
    best = n_layers // 2
    hooked = [best, min(best + 5, n_layers - 1)]
    g = torch.Generator().manual_seed(1)
    vectors = [
        (layer, torch.randn(hidden, generator=g)) for layer in hooked for _ in range(args.traits)
    ]
    projector = Projector(model, vectors, max_batch_tokens=args.batch_tokens, pad_id=pad)
    batches = [[seqs[i] for i in b] for b in projector._batches([len(s) for s in seqs])]
    padded = [pad_right(b, pad, stack.embed_tokens.weight.device) for b in batches]
    return SimpleNamespace(**locals())


def common_ways(args, s: SimpleNamespace | None = None) -> dict:
    """(b) all hidden states to the host, projected there; (a) batch size 1, full model with
    lm_head, a host sync per hooked layer. Functions of a batch index."""
    s = s or prepare(args)
    model, stack, vectors, hooked, batches = s.model, s.stack, s.vectors, s.hooked, s.batches
    units = {lay: (v / v.norm()).float() for lay, v in vectors}

    @torch.inference_mode()
    def hidden_states_to_host(i):
        ids, mask = s.padded[i]
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        host = [h.float().cpu() for h in out.hidden_states]  # every layer leaves the device
        for row, seq in enumerate(batches[i]):
            for lay, _ in vectors:
                (host[lay + 1][row, : len(seq)] @ units[lay]).tolist()

    def batch1_hook(layer):
        def hook(module, a, out):
            h = (out[0] if isinstance(out, tuple) else out)[0].float().cpu()  # sync here
            for lay, _ in vectors:
                if lay == layer:
                    (h @ units[lay]).tolist()

        return hook

    @torch.inference_mode()
    def batch1_sync_per_layer(i):
        with forward_hooks([(stack.layers[lay], batch1_hook(lay)) for lay in hooked]):
            for seq in batches[i]:  # the same prompts, one at a time, through the full model
                model(input_ids=torch.tensor([seq], device=stack.embed_tokens.weight.device))

    return {"hs": hidden_states_to_host, "b1": batch1_sync_per_layer}


def main() -> None:
    args = arguments()
    s = prepare(args)
    model, pad, stack, batches, padded = s.model, s.pad, s.stack, s.batches, s.padded
    vectors, hooked, n_layers, seqs = s.vectors, s.hooked, s.n_layers, s.seqs
    n_tokens = sum(len(q) for q in seqs)
    dev = args.device
    projector = s.projector
    full_hooks = Projector(
        model, vectors, max_batch_tokens=args.batch_tokens, pad_id=pad, early_stop=False
    )
    if args.same_process:
        common, elsewhere = common_ways(args, s), None
    else:
        elsewhere = Elsewhere(common_ways, args, {"RAYPIPE_MALLOC_TUNING": "0"})
        common = {name: elsewhere[name] for name in elsewhere.names}

    # Every candidate is a function of a batch index: within a round they take turns batch by
    # batch (see common.Rounds), so the machine's drift hits all of them alike.
    @torch.inference_mode()
    def bare(i):
        ids, mask = padded[i]
        stack(input_ids=ids, attention_mask=mask, use_cache=False)

    def run(pj):
        return lambda i: pj.project(batches[i])

    r, nb = args.repeats, len(batches)
    compiled = {}
    if args.compile:  # compiled in Rounds' warm-up pass (one-off, about 15 s on the CPU)
        pc = Projector(model, vectors, max_batch_tokens=args.batch_tokens, pad_id=pad, compile=True)
        compiled = {"proj_compiled": run(pc)}
    t = Rounds(
        {
            "bare": bare,
            "proj": run(projector),
            "hooks_full": run(full_hooks),
            **compiled,
            **common,
        },
        dev,
        r,
        nb,
    )

    # Early stop: the projector with its top hooked layer at k, against the same projector
    # hooked at the last layer (the whole stack). Embedding cost makes small k a bit slower
    # than (k+1)/n.
    def at(k):
        pk = Projector(model, [(k, vectors[0][1])], max_batch_tokens=args.batch_tokens, pad_id=pad)
        return run(pk)

    if elsewhere is not None:
        elsewhere.close()

    ks = sorted({n_layers // 4, n_layers // 2, (3 * n_layers) // 4})
    t_at = Rounds({k: at(k) for k in [n_layers - 1, *ks]}, dev, r, nb)
    errors = {}
    for k in ks:
        expected = (k + 1) / n_layers
        errors[k] = (t_at.ratio(k, n_layers - 1) - expected) / expected
    secs = {name: t.seconds(name) for name in t.names}
    tok = lambda name: f"{secs[name]:8.3f} s {n_tokens / secs[name]:>10,.0f} tok/s"  # noqa: E731

    def vs(a, b):
        lo, hi = t.spread(a, b)
        return f"{a}/{b} {t.ratio(a, b):.3f} (rounds {lo:.3f}-{hi:.3f})"

    print(
        f"device={dev} shape={'random ' + args.shape if args.random_weights else 'embedded'} "
        f"dtype={args.dtype} prompts={len(seqs)} tokens={n_tokens} batches={nb} "
        f"layers={n_layers} hooked={hooked} vectors={len(vectors)} rounds={r} (median of rounds)"
    )
    print(
        f"  allocator settings here: {'on' if hostmem._tuned else 'off'}; common ways: "
        + ("this process" if args.same_process else "own process, glibc defaults")
    )
    top = hooked[-1]
    print(f"  bare forward (decoder stack, all layers)     {tok('bare')}")
    print(
        f"  raypipe projector (early stop at {top:>2})        {tok('proj')}  {vs('proj', 'bare')}"
    )
    print(
        f"  raypipe projector, no early stop             {tok('hooks_full')}  "
        f"{vs('hooks_full', 'bare')}"
    )
    if compiled:
        print(
            f"  projector, --compile-prefill                 {tok('proj_compiled')}  "
            f"{vs('proj_compiled', 'proj')}"
        )
    print(f"  output_hidden_states -> host, project there  {tok('hs')}  {vs('hs', 'proj')}")
    print(f"  batch 1 + lm_head + host sync per layer      {tok('b1')}  {vs('b1', 'proj')}")
    for k, e in errors.items():
        lo, hi = t_at.spread(k, n_layers - 1)
        print(
            f"  early stop at layer {k:>2}: {e:+.1%} off (k+1)/n of the full stack "
            f"(rounds {lo:.3f}-{hi:.3f}, expected {(k + 1) / n_layers:.3f})"
        )
    emit(
        {
            "device": dev,
            "common_ways": "same process" if args.same_process else "own process",
            "overhead_vs_forward": round(t.ratio("hooks_full", "bare"), 4),
            "projector_vs_forward": round(t.ratio("proj", "bare"), 4),
            "speedup_vs_batch1": round(t.ratio("b1", "proj"), 2),
            "speedup_vs_hidden_states": round(t.ratio("hs", "proj"), 2),
            "early_stop_error": round(max(abs(e) for e in errors.values()), 4),
            **(
                {
                    "compiled_vs_projector": round(t.ratio("proj_compiled", "proj"), 3),
                    "speedup_vs_batch1_compiled": round(t.ratio("b1", "proj_compiled"), 2),
                    "speedup_vs_hidden_states_compiled": round(t.ratio("hs", "proj_compiled"), 2),
                }
                if compiled
                else {}
            ),
        }
    )


if __name__ == "__main__":
    main()

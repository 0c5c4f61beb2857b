"""Projection speed, side by side in one run: bare forward, raypipe's projector, and the
common ways (all hidden states to the host; batch size 1 with a host sync per hooked layer)."""

from __future__ import annotations

import torch
from common import emit, load, parser, sync, timeit, timeit_interleaved, token_batches

from raypipe.engine.hooks import decoder_stack, forward_hooks, pad_right
from raypipe.engine.projector import Projector


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--min-len", type=int, default=60)
    p.add_argument("--max-len", type=int, default=160)
    p.add_argument("--traits", type=int, default=6)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--batch1-prompts", type=int, default=16, help="subset timed at batch size 1")
    args = p.parse_args()
    model, pad = load(args)
    stack = decoder_stack(model)
    n_layers, hidden = len(stack.layers), stack.embed_tokens.weight.shape[1]
    vocab = stack.embed_tokens.weight.shape[0]
    dev = args.device
    seqs = token_batches(args.prompts, args.min_len, args.max_len, vocab)
    n_tokens = sum(len(s) for s in seqs)
    # Default `--layers best,best+5` with best near the middle: hooks at two layers per trait.
    best = n_layers // 2
    hooked = [best, min(best + 5, n_layers - 1)]
    g = torch.Generator().manual_seed(1)
    vectors = [
        (layer, torch.randn(hidden, generator=g)) for layer in hooked for _ in range(args.traits)
    ]
    projector = Projector(model, vectors, max_batch_tokens=args.batch_tokens, pad_id=pad)
    full_hooks = Projector(
        model, vectors, max_batch_tokens=args.batch_tokens, pad_id=pad, early_stop=False
    )
    batches = [[seqs[i] for i in b] for b in projector._batches([len(s) for s in seqs])]
    padded = [pad_right(b, pad, stack.embed_tokens.weight.device) for b in batches]

    @torch.inference_mode()
    def bare():
        for ids, mask in padded:
            stack(input_ids=ids, attention_mask=mask, use_cache=False)

    @torch.inference_mode()
    def hidden_states_to_host():
        units = {lay: (v / v.norm()).float() for lay, v in vectors}
        for (ids, mask), b in zip(padded, batches):
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            host = [h.float().cpu() for h in out.hidden_states]  # every layer leaves the device
            for row, s in enumerate(b):
                for lay, _ in vectors:
                    (host[lay + 1][row, : len(s)] @ units[lay]).tolist()

    sub = seqs[: args.batch1_prompts]

    @torch.inference_mode()
    def batch1_sync_per_layer():
        units = {lay: (v / v.norm()).float() for lay, v in vectors}
        layers = stack.layers

        def hook_for(layer):
            def hook(module, a, out):
                h = (out[0] if isinstance(out, tuple) else out)[0].float().cpu()  # sync here
                for lay, _ in vectors:
                    if lay == layer:
                        (h @ units[lay]).tolist()

            return hook

        with forward_hooks([(layers[lay], hook_for(lay)) for lay in hooked]):
            for s in sub:
                model(input_ids=torch.tensor([s], device=stack.embed_tokens.weight.device))

    def run(pj):
        return lambda: pj.project(seqs)

    r = args.repeats
    t = timeit_interleaved(
        {
            "bare": bare,
            "proj": run(projector),
            "hooks_full": run(full_hooks),
            "hs": hidden_states_to_host,
        },
        dev,
        r,
    )
    t_bare, t_proj, t_hooks_full, t_hs = t["bare"], t["proj"], t["hooks_full"], t["hs"]
    t_b1 = timeit(batch1_sync_per_layer, dev, max(1, r // 2)) * len(seqs) / len(sub)

    # Early stop: the projector with its top hooked layer at k, against the same projector
    # hooked at the last layer (the whole stack), taking turns. Embedding cost makes small k a
    # bit slower than (k+1)/n.
    def at(k):
        pk = Projector(model, [(k, vectors[0][1])], max_batch_tokens=args.batch_tokens, pad_id=pad)
        return run(pk)

    ks = sorted({n_layers // 4, n_layers // 2, (3 * n_layers) // 4})
    t_at = timeit_interleaved({k: at(k) for k in [n_layers - 1, *ks]}, dev, r)
    t_full = t_at[n_layers - 1]
    errors = {}
    for k in ks:
        expected = (k + 1) / n_layers
        errors[k] = (t_at[k] / t_full - expected) / expected
    sync(dev)
    tok = lambda t: f"{n_tokens / t:>10,.0f} tok/s"  # noqa: E731
    print(
        f"device={dev} shape={'random ' + args.shape if args.random_weights else 'embedded'} "
        f"dtype={args.dtype} prompts={len(seqs)} tokens={n_tokens} layers={n_layers} "
        f"hooked={hooked} vectors={len(vectors)}"
    )
    print(f"  bare forward (decoder stack, all layers)      {t_bare:8.3f} s {tok(t_bare)}")
    top = hooked[-1]
    print(f"  raypipe projector (early stop at {top:>2})         {t_proj:8.3f} s {tok(t_proj)}")
    print(
        f"  raypipe projector, no early stop              {t_hooks_full:8.3f} s {tok(t_hooks_full)}"
    )
    print(f"  output_hidden_states -> host, project there   {t_hs:8.3f} s {tok(t_hs)}")
    print(
        f"  batch 1 + lm_head + host sync per layer       {t_b1:8.3f} s {tok(t_b1)} "
        f"(timed on {len(sub)} prompts, scaled)"
    )
    for k, e in errors.items():
        print(f"  early stop at layer {k:>2}: {e:+.1%} off (k+1)/n of the full stack")
    emit(
        {
            "device": dev,
            "overhead_vs_forward": round(t_hooks_full / t_bare, 4),
            "projector_vs_forward": round(t_proj / t_bare, 4),
            "speedup_vs_batch1": round(t_b1 / t_proj, 2),
            "speedup_vs_hidden_states": round(t_hs / t_proj, 2),
            "early_stop_error": round(max(abs(e) for e in errors.values()), 4),
        }
    )


if __name__ == "__main__":
    main()

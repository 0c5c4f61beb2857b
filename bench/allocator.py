"""Host allocator settings (raypipe.engine.hostmem), side by side: raypipe's prefill and HF
generation in this process, which load_model tuned, and the same code in a second process left
at glibc's defaults (RAYPIPE_MALLOC_TUNING=0). Results are bit-identical; only time and page
faults differ."""

from __future__ import annotations

import resource

import torch
from common import Elsewhere, Rounds, emit, load, parser, token_batches
from generation import _Tok, mixed_prompts

from raypipe.engine import hostmem
from raypipe.engine.generate import GenerationOptions, Generator
from raypipe.engine.projector import Projector


def arguments():
    p = parser(__doc__)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch-tokens", type=int, default=16384, help="prefill batch budget")
    p.add_argument("--gen-prompts", type=int, default=24)
    p.add_argument("--max-new-tokens", type=int, default=16)
    return p.parse_args()


def workloads(args) -> dict:
    """{name: fn(unit)}: prefill batches through the projector, generation on mixed prompts."""
    model, pad = load(args)
    vocab = model.config.vocab_size
    seqs = token_batches(args.prompts, 60, 160, vocab)
    hidden = model.config.hidden_size
    n = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(1)
    vectors = [(layer, torch.randn(hidden, generator=g)) for layer in (n // 2, n // 2 + 5)]
    projector = Projector(model, vectors, max_batch_tokens=args.batch_tokens, pad_id=pad)
    batches = [[seqs[i] for i in b] for b in projector._batches([len(s) for s in seqs])]
    eos = vocab + 1 if args.random_weights else model.generation_config.eos_token_id
    if args.random_weights:
        model.generation_config.eos_token_id = None
    gen = Generator(model, _Tok(pad, eos), GenerationOptions(max_new_tokens=args.max_new_tokens))
    prompts = mixed_prompts(args.gen_prompts, vocab)

    def faults(_):
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    return {
        "prefill": lambda i: projector.project(batches[i % len(batches)]),
        "generate": lambda _: gen.generate(prompts),
        "faults": faults,
        "units": lambda _: len(batches),
        "tuned": lambda _: bool(hostmem._tuned),
    }


def main() -> None:
    args = arguments()
    here = workloads(args)
    there = Elsewhere(workloads, args, {"RAYPIPE_MALLOC_TUNING": "0"})
    assert here["tuned"](0) and not there["tuned"](0), "allocator settings not as intended"
    units = here["units"](0)
    result = {"device": args.device}
    lines = []
    for name, n_units in (("prefill", units), ("generate", 1)):
        before = {"here": here["faults"](0), "there": there["faults"](0)}
        t = Rounds(
            {"tuned": here[name], "default": there[name]}, args.device, args.repeats, n_units
        )
        # Faults over the warm-up pass and every round: per unit of work.
        calls = n_units * (args.repeats + 1)
        per = {
            k: (f(0) - before[k]) / calls
            for k, f in (("here", here["faults"]), ("there", there["faults"]))
        }
        lo, hi = t.spread("default", "tuned")
        lines.append(
            f"  {name:<9} tuned {t.seconds('tuned'):7.2f} s  "
            f"glibc defaults {t.seconds('default'):7.2f} s"
            f"  default/tuned {t.ratio('default', 'tuned'):.3f} (rounds {lo:.3f}-{hi:.3f})"
            f"  minor page faults per unit {per['here']:,.0f} vs {per['there']:,.0f}"
        )
        result[f"allocator_speedup_{name}"] = round(t.ratio("default", "tuned"), 3)
    there.close()
    shape = "random " + args.shape if args.random_weights else "embedded"
    print(
        f"device={args.device} shape={shape} "
        f"dtype={args.dtype} prefill: {args.prompts} prompts in {units} batches of <= "
        f"{args.batch_tokens} tokens; generate: {args.gen_prompts} mixed prompts, "
        f"{args.max_new_tokens} new tokens; rounds={args.repeats} (median of rounds)"
    )
    print("\n".join(lines))
    emit(result)


if __name__ == "__main__":
    main()

"""Generation throughput, side by side: length-sorted token-budget batches vs unsorted fixed
batches on a mixed-length prompt set (and a static cache, which HF `generate` compiles on a GPU)."""

from __future__ import annotations

import dataclasses

import torch
from common import Rounds, emit, load, parser, token_batches

from raypipe.engine.generate import GenerationOptions, Generator


class _Tok:
    """Just what Generator needs from a tokenizer, for random-weight models."""

    def __init__(self, pad: int, eos: int):
        self.pad_token_id, self.eos_token_id = pad, eos


def mixed_prompts(n: int, vocab: int) -> list[list[int]]:
    # Mostly short chat prompts with a long tail, as in real prompt sets.
    short = token_batches(n - n // 8, 20, 80, vocab, seed=2)
    long = token_batches(n // 8, 300, 700, vocab, seed=3)
    mixed = short + long
    g = torch.Generator().manual_seed(4)
    return [mixed[i] for i in torch.randperm(len(mixed), generator=g).tolist()]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--fixed-batch", type=int, default=8, help="the unsorted baseline's batch size")
    p.add_argument("--batch-tokens", type=int, default=16384)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument(
        "--static-cache",
        action="store_true",
        help="also time a static cache (compiled by generate on CUDA)",
    )
    args = p.parse_args()
    model, pad = load(args)
    vocab = model.config.vocab_size
    # Random weights never emit EOS on purpose; an EOS id outside the vocab keeps lengths fixed.
    tok = _Tok(pad, vocab + 1 if args.random_weights else model.generation_config.eos_token_id)
    if args.random_weights:
        model.generation_config.eos_token_id = None
    prompts = mixed_prompts(args.prompts, vocab)
    base = GenerationOptions(max_new_tokens=args.max_new_tokens)
    sorted_opts = dataclasses.replace(
        base, max_batch_size=args.max_batch, max_batch_tokens=args.batch_tokens
    )
    fixed_opts = dataclasses.replace(
        base, max_batch_size=args.fixed_batch, max_batch_tokens=10**9, sort_by_length=False
    )

    def timed(opts, before=None):
        gen = Generator(model, tok, opts)
        counts = []

        def fn(_):
            if before is not None:
                before()
            counts.append(sum(len(o) for o in gen.generate(prompts)))

        return fn, counts

    fns = {"sorted": timed(sorted_opts), "fixed": timed(fixed_opts)}
    t = Rounds({k: f for k, (f, _) in fns.items()}, args.device, args.repeats)
    n_sorted, n_fixed = fns["sorted"][1][-1], fns["fixed"][1][-1]
    t_sorted, t_fixed = t.seconds("sorted"), t.seconds("fixed")
    print(
        f"device={args.device} prompts={len(prompts)} max_new_tokens={args.max_new_tokens} "
        f"prompt tokens={sum(map(len, prompts))} rounds={args.repeats} (median of rounds)"
    )
    print(
        f"  sorted, token-budget batches   {t_sorted:8.2f} s  {n_sorted / t_sorted:9.1f} new tok/s"
    )
    print(
        f"  unsorted, fixed batch {args.fixed_batch:<3}      {t_fixed:8.2f} s  "
        f"{n_fixed / t_fixed:9.1f} new tok/s"
    )
    # Both generate every new token (greedy, the same prompts): the rate ratio is n_s/n_f times
    # the per-round time ratio.
    lo, hi = t.spread("fixed", "sorted")
    scale = n_sorted / n_fixed
    print(f"  sorted / fixed rate per round: {lo * scale:.2f}-{hi * scale:.2f}")
    result = {
        "device": args.device,
        "sorted_generation_speedup": round(t.ratio("fixed", "sorted") * scale, 2),
        "sorted_tok_s": round(n_sorted / t_sorted, 1),
        "fixed_tok_s": round(n_fixed / t_fixed, 1),
    }
    if args.static_cache:
        # HF's own way: with a static cache `generate` compiles the decode step itself on CUDA
        # (CompileConfig, CUDA graphs; compiling model.forward by hand as well broke there with
        # "accessing tensor output of CUDAGraphs that has been overwritten"). Elsewhere it does
        # not compile, and this times a static cache alone.
        def use(static: bool):
            def set_mode():
                model.generation_config.cache_implementation = "static" if static else None

            return set_mode

        try:
            plain, _ = timed(sorted_opts, use(False))
            static, counts = timed(sorted_opts, use(True))
            ts = Rounds({"plain": plain, "static": static}, args.device, args.repeats)
            n_static, t_static = counts[-1], ts.seconds("static")
            compiled = "compiled by generate" if args.device.startswith("cuda") else "no compile"
            print(
                f"  sorted + static cache ({compiled}) {t_static:7.2f} s  "
                f"{n_static / t_static:9.1f} new tok/s"
            )
            result["static_cache_vs_plain"] = round(
                ts.ratio("plain", "static") * n_static / n_sorted, 2
            )
        except Exception as e:  # reported, not hidden: the figure is simply absent
            print(f"  static cache failed: {type(e).__name__}: {e}")
        finally:
            use(False)()
    emit(result)


if __name__ == "__main__":
    main()

"""Generation throughput, side by side: length-sorted token-budget batches vs unsorted fixed
batches on a mixed-length prompt set (and, on a GPU, a static cache with compilation)."""

from __future__ import annotations

import dataclasses

import torch
from common import emit, load, parser, timeit_interleaved, token_batches

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
    p.add_argument("--static-cache", action="store_true", help="also time static cache + compile")
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

    def timed(opts):
        gen = Generator(model, tok, opts)
        counts = []

        def fn():
            counts.append(sum(len(o) for o in gen.generate(prompts)))

        return fn, counts

    fns = {"sorted": timed(sorted_opts), "fixed": timed(fixed_opts)}
    t = timeit_interleaved({k: f for k, (f, _) in fns.items()}, args.device, args.repeats)
    t_sorted, n_sorted = t["sorted"], fns["sorted"][1][-1]
    t_fixed, n_fixed = t["fixed"], fns["fixed"][1][-1]
    print(
        f"device={args.device} prompts={len(prompts)} max_new_tokens={args.max_new_tokens} "
        f"prompt tokens={sum(map(len, prompts))}"
    )
    print(
        f"  sorted, token-budget batches   {t_sorted:8.2f} s  {n_sorted / t_sorted:9.1f} new tok/s"
    )
    print(
        f"  unsorted, fixed batch {args.fixed_batch:<3}      {t_fixed:8.2f} s  "
        f"{n_fixed / t_fixed:9.1f} new tok/s"
    )
    result = {
        "device": args.device,
        "sorted_generation_speedup": round((n_sorted / t_sorted) / (n_fixed / t_fixed), 2),
        "sorted_tok_s": round(n_sorted / t_sorted, 1),
        "fixed_tok_s": round(n_fixed / t_fixed, 1),
    }
    if args.static_cache:
        try:
            model.generation_config.cache_implementation = "static"
            model.forward = torch.compile(model.forward, mode="reduce-overhead")
            static, counts = timed(sorted_opts)
            t_static = timeit_interleaved({"static": static}, args.device, args.repeats)["static"]
            n_static = counts[-1]
            print(
                f"  sorted + static cache, compiled {t_static:7.2f} s  "
                f"{n_static / t_static:9.1f} new tok/s"
            )
            result["static_compiled_vs_plain"] = round(
                (n_static / t_static) / (n_sorted / t_sorted), 2
            )
        except Exception as e:  # reported, not hidden: the figure is simply absent
            print(f"  static cache + compile failed: {type(e).__name__}: {e}")
    emit(result)


if __name__ == "__main__":
    main()

"""Generation throughput, side by side: length-sorted token-budget batches vs unsorted fixed
batches on a mixed-length prompt set; optionally a static cache (which HF `generate` compiles on
a GPU) and HF continuous batching (`generate_batch`)."""

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
        help="also time a static cache (compiled by generate on CUDA; on the CPU also with "
        "compile forced)",
    )
    p.add_argument(
        "--no-fixed",
        action="store_true",
        help="skip sorted vs unsorted fixed batches (for runs of the extras alone)",
    )
    p.add_argument(
        "--continuous",
        action="store_true",
        help="also time HF continuous batching (generate_batch) against the sorted batches",
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

    print(
        f"device={args.device} prompts={len(prompts)} max_new_tokens={args.max_new_tokens} "
        f"prompt tokens={sum(map(len, prompts))} rounds={args.repeats} (median of rounds)"
    )
    result: dict = {"device": args.device}
    if not args.no_fixed:
        fns = {"sorted": timed(sorted_opts), "fixed": timed(fixed_opts)}
        t = Rounds({k: f for k, (f, _) in fns.items()}, args.device, args.repeats)
        n_sorted, n_fixed = fns["sorted"][1][-1], fns["fixed"][1][-1]
        t_sorted, t_fixed = t.seconds("sorted"), t.seconds("fixed")
        print(
            f"  sorted, token-budget batches   {t_sorted:8.2f} s  "
            f"{n_sorted / t_sorted:9.1f} new tok/s"
        )
        print(
            f"  unsorted, fixed batch {args.fixed_batch:<3}      {t_fixed:8.2f} s  "
            f"{n_fixed / t_fixed:9.1f} new tok/s"
        )
        # Both generate every new token (greedy, the same prompts): the rate ratio is n_s/n_f
        # times the per-round time ratio.
        lo, hi = t.spread("fixed", "sorted")
        scale = n_sorted / n_fixed
        print(f"  sorted / fixed rate per round: {lo * scale:.2f}-{hi * scale:.2f}")
        result.update(
            sorted_generation_speedup=round(t.ratio("fixed", "sorted") * scale, 2),
            sorted_tok_s=round(n_sorted / t_sorted, 1),
            fixed_tok_s=round(n_fixed / t_fixed, 1),
        )
    if args.static_cache:
        # HF's own way: with a static cache `generate` compiles the decode step itself on CUDA
        # (CompileConfig, CUDA graphs; compiling model.forward by hand as well broke there with
        # "accessing tensor output of CUDAGraphs that has been overwritten"). Elsewhere it does
        # not compile, so on the CPU a third candidate asks it to (`_compile_all_devices`, HF's
        # switch for testing compile off CUDA). Compiles happen in the warm-up pass, untimed.
        from transformers import CompileConfig

        def use(static: bool, compile_here: bool = False):
            def set_mode():
                gc = model.generation_config
                gc.cache_implementation = "static" if static else None
                cc = None
                if compile_here:
                    cc = CompileConfig()
                    cc._compile_all_devices = True
                gc.compile_config = cc

            return set_mode

        cuda = args.device.startswith("cuda")
        arms = {"plain": use(False), "static": use(True)}
        if not cuda:
            arms["static_compiled"] = use(True, compile_here=True)
        try:
            made = {name: timed(sorted_opts, before) for name, before in arms.items()}
            ts = Rounds({k: f for k, (f, _) in made.items()}, args.device, args.repeats)
            labels = {
                "plain": "plain generate, same rounds",
                "static": "compiled by generate" if cuda else "no compile",
                "static_compiled": "compile forced",
            }
            for name in arms:
                n_arm, t_arm = made[name][1][-1], ts.seconds(name)
                what = "sorted" if name == "plain" else "sorted + static cache"
                print(f"  {what} ({labels[name]}) {t_arm:7.2f} s  {n_arm / t_arm:9.1f} new tok/s")
                if name == "plain":
                    continue
                key = "static_cache_vs_plain" if name == "static" else "static_compiled_vs_plain"
                result[key] = round(ts.ratio("plain", name) * n_arm / made["plain"][1][-1], 2)
        except Exception as e:  # reported, not hidden: the figure is simply absent
            print(f"  static cache failed: {type(e).__name__}: {e}")
        finally:
            use(False)()
    if args.continuous:
        # HF's continuous batching (`generate_batch`: a paged cache, finished rows replaced by
        # waiting prompts, CUDA graphs on a GPU) vs raypipe's sorted batches of `generate`.
        from transformers import GenerationConfig

        gc = GenerationConfig(
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            eos_token_id=None if args.random_weights else tok.eos_token_id,
            pad_token_id=pad,
        )
        cb_counts: list[int] = []

        def continuous(_):
            out = model.generate_batch(inputs=prompts, generation_config=gc, progress_bar=False)
            cb_counts.append(sum(len(o.generated_tokens) for o in out.values()))

        try:
            plain, counts = timed(sorted_opts)
            tc = Rounds({"plain": plain, "continuous": continuous}, args.device, args.repeats)
            n_cb, t_cb = cb_counts[-1], tc.seconds("continuous")
            t_plain = tc.seconds("plain")
            print(
                f"  sorted (plain generate, same rounds) {t_plain:7.2f} s  "
                f"{counts[-1] / t_plain:9.1f} new tok/s"
            )
            print(
                f"  continuous batching (generate_batch) {t_cb:7.2f} s  "
                f"{n_cb / t_cb:9.1f} new tok/s"
            )
            result["continuous_vs_sorted"] = round(
                tc.ratio("plain", "continuous") * n_cb / counts[-1], 2
            )
        except Exception as e:
            print(f"  continuous batching failed: {type(e).__name__}: {e}")
    emit(result)


if __name__ == "__main__":
    main()

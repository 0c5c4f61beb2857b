"""Generation throughput, side by side: the HF Responder (fp32, bf16) vs the vLLM backend (fp32)."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from common import emit

ROOT = Path(__file__).resolve().parents[1]


def new_tokens(responses) -> int:
    return sum(len(r.token_ids) - r.prompt_end for r in responses)


def round_robin(responders: dict, items, repeats: int) -> dict[str, tuple[list[float], int, list]]:
    """Median seconds per backend, timed in turns (the machine is shared: load shifts over
    minutes, and turns spread it evenly), after a two-prompt warm-up of each."""
    for responder in responders.values():
        responder.respond(items[:2])
    times: dict[str, list[float]] = {name: [] for name in responders}
    outs = {}
    for _ in range(repeats):
        for name, responder in responders.items():
            t = time.perf_counter()
            outs[name] = responder.respond(items)
            times[name].append(time.perf_counter() - t)
    return {n: (times[n], new_tokens(outs[n]), outs[n]) for n in responders}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--prompt-set", default="starter_prompts/general")
    p.add_argument("--prompts", type=int, default=40)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, help="HF torch threads [all cores]")
    p.add_argument(
        "--reserved-cpus",
        type=int,
        help="vLLM CPU: cores kept for its scheduler (VLLM_CPU_NUM_OF_RESERVED_CPU) [vLLM: 1]",
    )
    p.add_argument("--no-bf16", action="store_true", help="skip the HF bf16 run")
    args = p.parse_args()

    import torch

    from raypipe.engine.generate import GenerationOptions, uses_chat_template
    from raypipe.engine.models import ModelSpec, load_model
    from raypipe.engine.respond import Responder
    from raypipe.engine.vllm_backend import VLLMResponder
    from raypipe.store.prompts import load_prompt_set

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    cache = Path(os.environ.get("RAYPIPE_CACHE", "~/.cache/raypipe")).expanduser()
    prompts = load_prompt_set(ROOT / "datasets", args.prompt_set).items[: args.prompts]
    items = [(x.text, x.system_prompt) for x in prompts]
    opts = GenerationOptions(max_new_tokens=args.max_new_tokens)

    def spec(dtype: str) -> ModelSpec:
        return ModelSpec("smollm2-135m-instruct", cache, dtype=dtype, device="cpu")

    responders, startup = {}, {}
    for dtype in ("float32",) + (() if args.no_bf16 else ("bfloat16",)):
        t = time.perf_counter()
        model, tok = load_model(spec(dtype))
        responders[f"hf {dtype}"] = Responder(model, tok, opts, uses_chat_template(tok, None))
        startup[f"hf {dtype}"] = time.perf_counter() - t
    if args.reserved_cpus is not None:
        os.environ["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(args.reserved_cpus)  # read by vLLM only
    t = time.perf_counter()
    vllm_responder = VLLMResponder(spec("float32"), opts, None)
    responders["vllm float32"] = vllm_responder
    startup["vllm float32"] = time.perf_counter() - t
    try:
        timings = round_robin(responders, items, args.repeats)
    finally:
        vllm_responder.close()
    rows = {name: (startup[name], statistics.median(t), n) for name, (t, n, _) in timings.items()}
    outputs = {name: out for name, (_, _, out) in timings.items()}
    out = outputs["vllm float32"]

    hf32 = outputs["hf float32"]
    same = sum(a.token_ids == b.token_ids for a, b in zip(hf32, out))
    load = os.getloadavg()[0]
    print(
        f"prompts={len(items)} max_new_tokens={args.max_new_tokens} cores={os.cpu_count()} "
        f"load average={load:.1f} (shared machine: absolute numbers are noisy)"
    )
    print(
        f"  {'backend':<14}{'startup s':>10}{'generate s':>12}{'new tokens':>12}{'tok/s':>9}"
        "  runs (s)"
    )
    for name, (start, secs, n) in rows.items():
        runs = " ".join(f"{x:.1f}" for x in timings[name][0])
        print(f"  {name:<14}{start:10.1f}{secs:12.2f}{n:12d}{n / secs:9.1f}  {runs}")
    print(f"  vllm fp32 token ids identical to hf fp32: {same}/{len(items)}")

    def rate(name: str) -> float:
        _, secs, n = rows[name]
        return n / secs

    result = {
        "vllm_vs_hf": round(rate("vllm float32") / rate("hf float32"), 2),
        "vllm_tok_s": round(rate("vllm float32"), 1),
        "hf_fp32_tok_s": round(rate("hf float32"), 1),
        "vllm_startup_s": round(rows["vllm float32"][0], 1),
        "vllm_fp32_identical": f"{same}/{len(items)}",
        "load_average": round(load, 1),
    }
    if "hf bfloat16" in rows:
        result["vllm_vs_hf_bf16"] = round(rate("vllm float32") / rate("hf bfloat16"), 2)
        result["hf_bf16_tok_s"] = round(rate("hf bfloat16"), 1)
    emit(result)


if __name__ == "__main__":
    main()

"""Monitoring on vLLM, side by side on the same prompts: plain vLLM generation (no hooks);
raypipe's one-pass monitoring (hooks inside vLLM's model score every token as it is computed);
vLLM generation then the HF hooked prefill (the two-pass way, a second model copy); and the HF
fused stage (HF generation, then the prefill on the same model). Then how the stage feeds the
engine: each slice cut into Ray-sized blocks (--block-rows) handed over one after another (the
engine drains between blocks: the old stage) or all in flight at once (VLLMStage now).

Last line: JSON with onepass_vs_plain (time of one-pass monitoring / plain generation; target
<= 1.15 on CPU, <= 1.10 on CUDA), onepass_vs_twopass and inflight_vs_serial.

CPU (the embedded model, fp32):      python bench/vllm_monitor.py
CUDA node with raypipe[vllm]:       python bench/vllm_monitor.py --device cuda
  (bf16; `--random-weights --shape llama-3.1-8b` for the 8B shape, no download.)
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHAPES, Rounds, emit, parser  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def random_model_dir(shape: str, dtype: str, folder: Path) -> Path:
    """A random-weight Llama of a real shape saved with the embedded model's tokenizer (no
    download): vLLM loads models from folders."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raypipe.engine.models import load_tokenizer, resolve_model_path

    if (folder / "config.json").is_file():
        return folder
    cache = Path(os.environ.get("RAYPIPE_CACHE", "~/.cache/raypipe")).expanduser()
    tok = load_tokenizer(resolve_model_path("smollm2-135m-instruct", cache))
    cfg = LlamaConfig(**{**SHAPES[shape], "vocab_size": max(len(tok), 49152)}, pad_token_id=0)
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(getattr(torch, dtype))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class Unhooked:
    """Plain generation on the monitored engine: hooks removed for the call, then put back
    (a few KB of vectors; the engine, its threads and its memory stay the same)."""

    def __init__(self, mon, opts):
        from raypipe.engine.respond import Responder
        from raypipe.engine.vllm_backend import VLLMGenerator

        self.mon = mon
        r = mon.responder
        self.responder = Responder(None, r.tokenizer, opts, r.chat, r.context, r.truncate)
        self.responder.generator = VLLMGenerator(mon.engine, opts, r.generator.eos)

    def respond(self, items):
        self.mon.engine.rpc("raypipe_remove")
        try:
            return self.responder.respond(items)
        finally:
            self.mon.install(*self.mon.installed)

    def close(self) -> None:
        pass


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prompt-set", default="starter_prompts/general")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--traits", type=int, default=12, help="vectors per hooked layer")
    p.add_argument(
        "--units", type=int, default=4, help="prompt slices the candidates take turns on"
    )
    p.add_argument("--layers", default="best", help="hooked layers: 'best' (n/2 and n/2+5)")
    p.add_argument("--skip-hf", action="store_true", help="leave out the HF fused stage")
    p.add_argument(
        "--block-rows", type=int, default=4, help="rows per Ray block in the feeding comparison"
    )
    p.add_argument(
        "--plain-engine",
        choices=("same", "separate"),
        help="plain vLLM on the monitored engine with its hooks removed (same: the CPU default,"
        " where both run eager and two engines in one process fight over the cores) or on an "
        "engine of its own with vLLM's defaults (separate: the CUDA default, compiled graphs)",
    )
    p.set_defaults(dtype=None, repeats=3)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # both engines in this process
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")

    import torch

    from raypipe.engine.generate import GenerationOptions, uses_chat_template
    from raypipe.engine.models import ModelSpec, load_config, load_model, text_config
    from raypipe.engine.projector import Projector
    from raypipe.engine.respond import Responder
    from raypipe.engine.vllm_backend import VLLMMonitor, VLLMResponder
    from raypipe.pipeline.vllm_stage import BLOCKS_IN_FLIGHT
    from raypipe.store.prompts import load_prompt_set

    if args.threads:
        torch.set_num_threads(args.threads)
    cache = Path(os.environ.get("RAYPIPE_CACHE", "~/.cache/raypipe")).expanduser()
    model_id = "smollm2-135m-instruct"
    if args.random_weights:
        model_id = str(random_model_dir(args.shape, dtype, cache / f"bench-random-{args.shape}"))
    spec = ModelSpec(model_id, cache, dtype=dtype, device=args.device)
    n_layers = int(text_config(load_config(spec.model, spec.cache_dir)).num_hidden_layers)
    hidden = int(text_config(load_config(spec.model, spec.cache_dir)).hidden_size)
    layers = (
        [n_layers // 2, min(n_layers - 1, n_layers // 2 + 5)]
        if args.layers == "best"
        else [int(x) for x in args.layers.split(",")]
    )
    g = torch.Generator().manual_seed(0)
    vectors = [
        (layer, torch.randn(hidden, generator=g).tolist())
        for layer in layers
        for _ in range(args.traits)
    ]
    prompts = load_prompt_set(ROOT / "datasets", args.prompt_set).items
    items = [(x.text, x.system_prompt) for x in prompts][: args.prompts]
    opts = GenerationOptions(max_new_tokens=args.max_new_tokens)
    # Two engines share the device: on CUDA each takes a share of its memory.
    engine = {"gpu_memory_utilization": 0.35} if cuda else {}

    separate = (args.plain_engine or ("separate" if cuda else "same")) == "separate"
    mon = VLLMMonitor(spec, opts, None, vectors, context=4096, engine_args=engine)
    if separate:
        plain = VLLMResponder(spec, opts, None, context=4096, engine_args=engine)
    else:
        plain = Unhooked(mon, opts)
    model, tok = load_model(spec)
    projector = Projector(model, vectors)
    hf = Responder(model, tok, opts, uses_chat_template(tok, None), context=4096)

    outs: dict[str, list] = {}
    k = -(-len(items) // args.units)
    units = [items[i : i + k] for i in range(0, len(items), k)]

    def keep(name: str, unit: int, value) -> None:
        outs.setdefault(name, [None] * len(units))[unit] = value

    def run_plain(u):
        keep("plain", u, plain.respond(units[u]))

    def run_onepass(u):
        res = mon.respond(units[u])
        keep("onepass", u, res)
        keep("onepass scores", u, mon.take_scores([r.token_ids for r in res]))

    def run_twopass(u):
        res = plain.respond(units[u])
        keep("twopass scores", u, projector.project([r.token_ids for r in res]))

    def run_hf(u):
        res = hf.respond(units[u])
        projector.project([r.token_ids for r in res])

    def one_block(items):
        res = mon.respond(items)
        return mon.take([r.token_ids for r in res])

    def blocks(u):
        n = args.block_rows
        return [units[u][i : i + n] for i in range(0, len(units[u]), n)]

    def run_serial(u):  # the old stage: a block at a time, the engine drains between them
        for b in blocks(u):
            one_block(b)

    pool = ThreadPoolExecutor(max_workers=BLOCKS_IN_FLIGHT)

    def run_inflight(u):  # VLLMStage: blocks in flight at once on the one engine
        list(pool.map(one_block, blocks(u)))

    print(f"plain vLLM on {'an engine of its own' if separate else 'the same engine, unhooked'}")
    fns = {"plain vllm": run_plain, "one-pass": run_onepass, "two-pass": run_twopass}
    fns |= {"blocks serial": run_serial, "blocks in flight": run_inflight}
    if not args.skip_hf:
        fns["hf fused"] = run_hf
    try:
        r = Rounds(fns, args.device, args.repeats, units=len(units))
    finally:
        pool.shutdown()
        plain.close()
        mon.close()
    outs = {name: [x for part in parts for x in part] for name, parts in outs.items()}
    new = sum(len(x.token_ids) - x.prompt_end for x in outs["onepass"])
    same = sum(a.token_ids == b.token_ids for a, b in zip(outs["plain"], outs["onepass"]))
    import numpy as np

    worst = max(
        float(np.abs(a.scores - b.scores).max() / max(np.abs(b.scores).max(), 1e-6))
        for a, b in zip(outs["onepass scores"], outs["twopass scores"])
    )
    print(
        f"{model_id} {dtype} on {args.device}: {len(items)} prompts x {args.max_new_tokens} "
        f"new tokens ({new} generated), {len(vectors)} vectors at layers {layers}, "
        f"{args.repeats} rounds of {len(units)} slices, load average {os.getloadavg()[0]:.1f}"
    )
    print(f"  {'candidate':<18}{'median s':>10}{'new tok/s':>11}  per round (s)")
    for name in fns:
        per = " ".join(f"{t[name]:.2f}" for t in r.times)
        print(f"  {name:<18}{r.seconds(name):10.2f}{new / r.seconds(name):11.1f}  {per}")
    lo, hi = r.spread("one-pass", "plain vllm")
    print(f"  one-pass / plain per round: {lo:.3f}..{hi:.3f}")
    print(f"  one-pass ids = plain vLLM ids: {same}/{len(items)}")
    print(f"  one-pass vs two-pass (HF prefill) scores: worst relative error {worst:.2e}")
    result = {
        "onepass_vs_plain": round(r.ratio("one-pass", "plain vllm"), 3),
        "onepass_vs_twopass": round(r.ratio("one-pass", "two-pass"), 3),
        "twopass_vs_plain": round(r.ratio("two-pass", "plain vllm"), 3),
        "inflight_vs_serial": round(r.ratio("blocks in flight", "blocks serial"), 3),
        "onepass_tok_s": round(new / r.seconds("one-pass"), 1),
        "target": 1.10 if cuda else 1.15,
        "same_ids": f"{same}/{len(items)}",
        "max_rel_err_vs_hf": float(f"{worst:.2e}"),
    }
    if not args.skip_hf:
        result["onepass_vs_hf_fused"] = round(r.ratio("one-pass", "hf fused"), 3)
    emit(result)


if __name__ == "__main__":
    main()

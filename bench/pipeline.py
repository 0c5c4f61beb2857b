"""Pipeline overhead: `raypipe infer` (Ray Data, actor pools) vs the same engine objects
called in a plain loop on the same prompts. Start-up (Ray, actors, model loads) is excluded by
differencing: the pipeline runs on N/3 and on N prompts, and its rate is the extra tokens over
the extra time, which leaves every fixed cost out."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch
from common import emit, parser

from raypipe.engine.generate import GenerationOptions, uses_chat_template
from raypipe.engine.models import ModelSpec, load_model, resolve_model_path
from raypipe.engine.projector import Projector
from raypipe.engine.respond import Responder
from raypipe.options import (
    InferOptions,
    ModelOptions,
    OutputOptions,
    ProjectionOptions,
    RunOptions,
)
from raypipe.pipeline.job import run_infer
from raypipe.pipeline.plan import plan_infer

REPO = Path(__file__).resolve().parents[1]
TRAITS = ("behavior/refusal", "behavior/sycophancy", "emotion/optimism", "tone/formality")


def starter_texts(n: int) -> list[str]:
    texts = []
    for name in ("general", "sycophancy_bait", "refusal_probes"):
        path = REPO / "datasets/inference/starter_prompts" / f"{name}.json"
        data = json.loads(path.read_text())
        texts += [p["text"] for p in data["prompts"]]
    # Starter-style: the starter prompts, cycled with a varying lead so each one is distinct.
    return [f"({i // len(texts) + 1}) {texts[i % len(texts)]}" for i in range(n)]


def make_root(root: Path, texts: list[str], hidden: int, n_layers: int) -> None:
    exp = root / "experiments" / "bench"
    exp.mkdir(parents=True)
    (exp / "config.json").write_text(
        json.dumps({"model_variants": {"instruct": {"model": "smollm2-135m-instruct"}}})
    )
    g = torch.Generator().manual_seed(0)
    for trait in TRAITS:
        d = exp / "extraction" / trait / "instruct" / "vectors" / "response_all" / "residual"
        d = d / "probe"
        d.mkdir(parents=True)
        layers = {}
        for layer in range(n_layers):
            torch.save(torch.randn(hidden, generator=g), d / f"layer{layer}.pt")
            layers[str(layer)] = {"baseline": 0.0, "val_effect_size": float(layer == 12)}
        (d / "metadata.json").write_text(
            json.dumps({"position": "response[:]", "method": "probe", "layers": layers})
        )
    ps = root / "datasets" / "inference" / "bench.json"
    ps.parent.mkdir(parents=True)
    ps.write_text(json.dumps({"prompts": [{"id": i, "text": t} for i, t in enumerate(texts)]}))


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--prompts", type=int, default=500)
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    cache = Path("~/.cache/raypipe").expanduser()
    resolve_model_path("smollm2-135m-instruct", cache)
    texts = starter_texts(args.prompts)
    gen = GenerationOptions(max_new_tokens=args.max_new_tokens, max_batch_size=args.batch_size)
    plans = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (max(1, len(texts) // 3), len(texts)):
            root = Path(tmp) / f"n{n}"
            make_root(root, texts[:n], 576, 30)
            opts = InferOptions(
                output=OutputOptions(root=root, experiment="bench", prompt_set="bench"),
                model=ModelOptions(dtype=args.dtype, cache_dir=cache, device=args.device),
                generation=gen,
                projection=ProjectionOptions(layers="best,best+5"),
                run=RunOptions(batch_size=args.batch_size, quiet=True, threads=args.threads),
            )
            plans.append(plan_infer(opts))
        plan = plans[-1]
        # The plain loop: the same engine objects, batch by batch, generate then project.
        spec = ModelSpec("smollm2-135m-instruct", cache, dtype=args.dtype, device=args.device)
        model, tok = load_model(spec)
        if args.threads:
            torch.set_num_threads(args.threads)
        responder = Responder(model, tok, gen, uses_chat_template(tok, None), plan.model.context)
        projector = Projector(
            model, [(v.layer, v.vector) for v in plan.vectors], pad_id=tok.pad_token_id or 0
        )
        t = time.perf_counter()
        tokens = 0
        for i in range(0, len(texts), args.batch_size):
            out = responder.respond([(x, None) for x in texts[i : i + args.batch_size]])
            projector.project([r.token_ids for r in out])
            tokens += sum(len(r.token_ids) for r in out)
        loop_tps = tokens / (time.perf_counter() - t)
        del model, responder, projector
        runs = []
        for pl in plans:
            t = time.perf_counter()
            s = run_infer(pl)
            runs.append((s.tokens, time.perf_counter() - t, s))
    (tok1, t1, _), (tok2, t2, summary) = runs
    pipe_tps = (tok2 - tok1) / (t2 - t1)
    print(
        f"device={args.device} prompts={len(texts)} max_new_tokens={args.max_new_tokens} "
        f"batch={args.batch_size} tokens={tokens}"
    )
    print(f"  engine in a plain loop            {loop_tps:9.1f} tok/s")
    print(
        f"  raypipe infer (after 1st batch)   {pipe_tps:9.1f} tok/s "
        f"(overall incl. start-up {summary.tokens_per_second:.1f})"
    )
    emit(
        {
            "device": args.device,
            "pipeline_efficiency": round(pipe_tps / loop_tps, 3),
            "loop_tok_s": round(loop_tps, 1),
            "pipeline_tok_s": round(pipe_tps, 1),
        }
    )


if __name__ == "__main__":
    main()

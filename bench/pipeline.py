"""Pipeline overhead: `raypipe infer` (Ray Data, a model actor, writer tasks) vs the same engine
objects called in a plain loop on the same prompts, in turns (loop, pipeline, loop, pipeline...)
so that drift in the machine's speed hits both alike. Start-up (Ray, actor start, model load,
the first batch with its one-time calibration pass) is left out of both: each rate is the
tokens after the first batch over the time after the first batch."""

from __future__ import annotations

import json
import statistics
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
from raypipe.store.vectors import load_vectors

REPO = Path(__file__).resolve().parents[1]
TRAITS = (
    "starter_traits/refusal",
    "starter_traits/sycophancy",
    "starter_traits/optimism",
    "starter_traits/formality",
)


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
    p.add_argument("--rounds", type=int, default=2, help="loop/pipeline pairs, in turns")
    args = p.parse_args()
    cache = Path("~/.cache/raypipe").expanduser()
    resolve_model_path("smollm2-135m-instruct", cache)
    texts = starter_texts(args.prompts)
    gen = GenerationOptions(max_new_tokens=args.max_new_tokens, max_batch_size=args.batch_size)

    def plan_for(root: Path):
        make_root(root, texts, 576, 30)
        opts = InferOptions(
            output=OutputOptions(root=root, experiment="bench", prompt_set="bench"),
            model=ModelOptions(dtype=args.dtype, cache_dir=cache, device=args.device),
            generation=gen,
            projection=ProjectionOptions(layers="best,best+5"),
            run=RunOptions(batch_size=args.batch_size, quiet=True, threads=args.threads),
        )
        return plan_infer(opts)

    def loop(model, tok, plan) -> float:
        """The same engine objects, batch by batch: generate, then project."""
        responder = Responder(model, tok, gen, uses_chat_template(tok, None), plan.model.context)
        projector = Projector(model, load_vectors(plan.vectors, None), pad_id=tok.pad_token_id or 0)
        marks = []
        t, tokens = time.perf_counter(), 0
        for i in range(0, len(texts), args.batch_size):
            out = responder.respond([(x, None) for x in texts[i : i + args.batch_size]])
            projector.project([r.token_ids for r in out])
            tokens += sum(len(r.token_ids) for r in out)
            marks.append((time.perf_counter() - t, tokens))
        return _steady_rate(marks)

    loop_rates, pipe_rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        spec = ModelSpec("smollm2-135m-instruct", cache, dtype=args.dtype, device=args.device)
        model, tok = load_model(spec)
        if args.threads:
            torch.set_num_threads(args.threads)
        for r in range(args.rounds):
            loop_rates.append(loop(model, tok, plan_for(Path(tmp) / f"loop{r}")))
            summary = run_infer(plan_for(Path(tmp) / f"pipe{r}"))  # a fresh tree: all to do
            pipe_rates.append(_steady_rate(summary.timeline))
            print(
                f"  round {r + 1}: loop {loop_rates[-1]:7.1f} tok/s, pipeline "
                f"{pipe_rates[-1]:7.1f} tok/s ({len(summary.timeline)} output batches, "
                f"{summary.tokens} tokens, overall incl. start-up "
                f"{summary.tokens_per_second:.1f} tok/s)",
                flush=True,
            )
    loop_tps, pipe_tps = statistics.median(loop_rates), statistics.median(pipe_rates)
    print(
        f"device={args.device} prompts={len(texts)} max_new_tokens={args.max_new_tokens} "
        f"batch={args.batch_size} rounds={args.rounds}"
    )
    print(f"  engine in a plain loop (after 1st batch)   {loop_tps:9.1f} tok/s")
    print(f"  raypipe infer (after 1st batch)            {pipe_tps:9.1f} tok/s")
    emit(
        {
            "device": args.device,
            "pipeline_efficiency": round(pipe_tps / loop_tps, 3),
            "loop_tok_s": round(loop_tps, 1),
            "pipeline_tok_s": round(pipe_tps, 1),
        }
    )


def _steady_rate(marks: list[tuple[float, int]]) -> float:
    """Tokens per second after the first batch, from (seconds, tokens so far) marks."""
    if len(marks) < 2:
        raise SystemExit("need at least two batches: raise --prompts or lower --batch-size")
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (n1 - n0) / (t1 - t0)


if __name__ == "__main__":
    main()

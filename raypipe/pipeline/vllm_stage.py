"""`--backend vllm`: generation and projection in one vLLM engine per replica (one model copy).

Each actor holds one engine with raypipe's hooks in its model (engine/vllm_hooks.py). A batch's
rows that need a response are generated and scored in the same forward passes; rows whose
response exists already (re-projection: new layers or traits) are scored by a prefill on the
same engine. Responses are on disk before their projections, as in FusedStage.

Keeping the engine full: vLLM batches every request it is given continuously, so the stage asks
Ray Data for large blocks (`--batch-size`, 64 rows by default) and hands each whole block to
the engine in one call; within a block, requests of every length share each step.
"""

from __future__ import annotations

import os

import pandas as pd

from raypipe.pipeline.stages import (
    GenerateStage,
    ProjectStage,
    _frame,
    _rows,
    put_scores,
    require,
    stage_vectors,
    write_responses,
)


class VLLMStage:
    """Generate + project (or prefill-only project) on one vLLM engine with hooks."""

    NEEDS = GenerateStage.NEEDS
    PRODUCES = GenerateStage.PRODUCES + ProjectStage.SCORE_COLUMNS

    def __init__(self, generate: dict, project: dict):
        from raypipe.engine.vllm_backend import VLLMMonitor

        tp = generate.get("tensor_parallel_size", 1)
        if tp == 1:
            # The engine core in this actor's process: starts in seconds, and no engine
            # process outlives a killed actor.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        spec = generate["spec"]
        dims = project.get("massive_dims")
        self.monitor = VLLMMonitor(
            spec,
            generate["opts"],
            generate["chat_config"],
            stage_vectors(spec, project["vectors"]),
            component=project["component"],
            massive_dims=list(dims) if dims else None,
            context=generate["context"],
            truncate=generate["truncate"],
            tensor_parallel_size=tp,
        )
        self.source = generate["source"]
        self.generate = GenerateStage(**generate)
        self.generate.responder = self.monitor  # its respond() also keeps the scores

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        require(batch, "vllm", self.NEEDS)
        rows = _rows(write_responses(self.generate(batch), self.source))
        for row in rows:
            for col in ProjectStage.SCORE_COLUMNS:
                row[col] = None
        todo = [r for r in rows if r["project"] and r["error"] is None]
        if todo:
            seqs = [list(map(int, r["token_ids"])) for r in todo]
            try:
                put_scores(todo, self.monitor.take_scores(seqs))
            except ValueError:
                if len(todo) == 1:
                    raise
                for row, seq in zip(todo, seqs):  # one sequence vLLM cannot take fails alone
                    try:
                        put_scores([row], self.monitor.take_scores([seq]))
                    except ValueError as e:
                        row["error"] = f"{type(e).__name__}: {e}"
        return _frame(rows, self.PRODUCES)

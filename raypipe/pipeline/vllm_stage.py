"""`--backend vllm`: generation and projection (or capture) in one vLLM engine per replica.

Each actor holds one engine with raypipe's hooks in its model (engine/vllm_hooks.py). A batch's
rows that need a response are generated and scored (or captured) in the same forward passes;
rows whose response exists already (re-projection: new layers or traits) go through a prefill
on the same engine. Responses are on disk before their projections, as in FusedStage.

Keeping the engine full: `__call__` is async, and Ray Data runs up to `blocks` calls of one
actor at once (the stage's Resources.max_concurrency). Each call's work runs on a thread of the
stage's own pool and hands its requests to the engine's loop (engine/vllm_loop.py), which steps
the requests of every block in flight together: a block that finishes early makes room for the
next one, and the engine never drains between blocks.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from raypipe.pipeline.stages import (
    SUMMARY_COLUMNS,
    GenerateStage,
    PassiveCalibration,
    ProjectStage,
    _frame,
    _rows,
    _seqs,
    capture_summary,
    claim_calibration,
    put_scores,
    require,
    stage_vectors,
    write_captures,
    write_responses,
)

BLOCKS_IN_FLIGHT = 4  # Ray blocks one engine works on at once


class VLLMStage:
    """Generate + project or capture (or prefill-only) on one vLLM engine with hooks; with
    neither `project` nor `capture`, generation alone (no hooks)."""

    NEEDS = GenerateStage.NEEDS
    PRODUCES = GenerateStage.PRODUCES + ProjectStage.SCORE_COLUMNS
    CAPTURE_PRODUCES = SUMMARY_COLUMNS

    def __init__(
        self,
        generate: dict,
        project: dict | None = None,
        capture: dict | None = None,
        blocks: int = BLOCKS_IN_FLIGHT,
    ):
        from raypipe.engine.vllm_backend import VLLMMonitor, VLLMResponder

        if project is not None and capture is not None:
            raise ValueError("VLLMStage: give project or capture, not both")
        tp = generate.get("tensor_parallel_size", 1)
        # The engine core in this actor's process: starts in seconds, and no engine process
        # outlives a killed actor (an engine-core process has no check that its parent lives;
        # the ranks of tensor_parallel_size > 1 do, and end with the actor).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        spec = generate["spec"]
        common = dict(
            context=generate["context"], truncate=generate["truncate"], tensor_parallel_size=tp
        )
        self.generate_only = project is None and capture is None
        if self.generate_only:
            self.sink = None
            self.monitor = VLLMResponder(spec, generate["opts"], generate["chat_config"], **common)
        elif capture is not None:
            self.sink = capture["sink"]
            self.monitor = VLLMMonitor(
                spec,
                generate["opts"],
                generate["chat_config"],
                None,
                component=self.sink.component,
                capture_layers=list(capture["layers"]),
                **common,
            )
        else:
            self.sink = None
            dims = project.get("massive_dims")
            self.monitor = VLLMMonitor(
                spec,
                generate["opts"],
                generate["chat_config"],
                stage_vectors(spec, project["vectors"]),
                component=project["component"],
                massive_dims=list(dims) if dims else None,
                **common,
            )
        self._start_calibration(project)
        self.source = generate["source"]
        self.generate = GenerateStage(**generate)
        self.generate.responder = self.monitor  # its respond() also keeps what the hooks saw
        self.pool = ThreadPoolExecutor(max_workers=blocks, thread_name_prefix="raypipe-vllm-block")

    def _start_calibration(self, project: dict | None) -> None:
        """SPEC 8 on vLLM: the one replica that claims the calibration replays the first
        prompts' whole sequences through a prefill with every block's residual kept (hooks of
        their own, engine/vllm_backend.VLLMMonitor.residuals) and feeds the same statistics
        as the HF prefill, in the same batches (plan_batches), until the budget is spent."""
        from raypipe.engine.calibration import CalibrationCollector

        target = project.get("calibration") if project else None
        self.claim = claim_calibration(target)  # held while this stage lives
        self.calibration = PassiveCalibration(target) if self.claim is not None else None
        self.collector = None
        self.calibration_lock = threading.Lock()  # the blocks in flight count one at a time
        if self.calibration is not None:
            from raypipe.engine.batching import overhead_tokens
            from raypipe.engine.vllm_backend import _on_cpu

            self.max_batch_tokens = project["max_batch_tokens"]
            # The HF prefill's batches (engine/projector.py), from the same config and dtype.
            model_config = self.monitor.llm.llm_engine.model_config
            self.overhead = overhead_tokens(
                model_config.hf_text_config,
                "cpu" if _on_cpu() else "cuda",
                model_config.dtype.itemsize,
            )
            self.collector = CalibrationCollector(
                None, budget=target.budget, n_layers=self.monitor.n_layers
            )
            if self.calibration.state is not None:
                self.collector.load_state_dict(self.calibration.state)

    async def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        # The block's work waits on the engine, which serves every block in flight at once.
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.run, batch)

    def run(self, batch: pd.DataFrame) -> pd.DataFrame:
        """One block, start to end (what __call__ runs on the stage's pool)."""
        require(batch, "vllm", self.NEEDS)
        if self.generate_only:
            return write_responses(self.generate(batch), self.source)
        rows = _rows(write_responses(self.generate(batch), self.source))
        if self.sink is None:
            for row in rows:
                for col in ProjectStage.SCORE_COLUMNS:
                    row[col] = None
        todo = [r for r in rows if r["project"] and r["error"] is None]
        got = self._take(todo)
        done = [(r, g) for r, g in zip(todo, got) if r["error"] is None]
        if self.sink is not None:
            write_captures(self.sink, [r for r, _ in done], [g for _, g in done])
            return capture_summary(rows)
        put_scores([r for r, _ in done], [g for _, g in done])
        if self.collector is not None:
            self._calibrate([r for r, _ in done])
        return _frame(rows, self.PRODUCES)

    def _calibrate(self, rows: list[dict]) -> None:
        import torch

        from raypipe.engine.batching import plan_batches

        with self.calibration_lock:
            if self.collector is None:
                return
            counting = [r for r, f in zip(rows, self.calibration.fresh(rows)) if f]
            if not counting:
                return
            c, seqs = self.collector, _seqs(counting)
            lengths = [len(s) for s in seqs]
            for batch in plan_batches(
                lengths, self.max_batch_tokens, overhead_tokens=self.overhead
            ):
                if c.done:
                    break
                states = self.monitor.residuals([seqs[i] for i in batch])  # [{L: (T, D)}]
                width = max(len(seqs[i]) for i in batch)
                mask = torch.zeros(len(batch), width, dtype=torch.long)  # (B, T)
                for b, i in enumerate(batch):
                    mask[b, : len(seqs[i])] = 1
                padded = {}
                for layer in range(c.n_layers):
                    dim = states[0][layer].shape[-1]
                    x = torch.zeros(len(batch), width, dim, dtype=torch.float32)  # (B, T, D)
                    for b, st in enumerate(states):
                        x[b, : st[layer].shape[0]] = st[layer]
                    padded[layer] = x
                c.observe_states(padded, mask)
            if self.calibration.save(c.result(), c.state_dict(), counting, c.done):
                self.collector = None
                self.monitor.drop_residual_hooks()
                self.claim.close()
                self.claim = None

    def _take(self, todo: list[dict]) -> list:
        """What the hooks kept for each row (a prefill for the rest); a sequence vLLM cannot
        take fails alone: its row gets the error, and None."""
        seqs = [list(map(int, r["token_ids"])) for r in todo]
        if not seqs:
            return []
        try:
            return self.monitor.take(seqs)
        except ValueError:
            pass
        out = []
        for row, seq in zip(todo, seqs):
            try:
                out.extend(self.monitor.take([seq]))
            except ValueError as e:
                row["error"] = f"{type(e).__name__}: {e}"
                out.append(None)
        return out

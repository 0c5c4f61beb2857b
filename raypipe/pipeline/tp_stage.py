"""Ray Data stage for tensor-parallel prefill: a gang of rank actors serving as one replica."""

from __future__ import annotations

import pandas as pd

from raypipe.engine.models import ModelSpec
from raypipe.errors import RaypipeError
from raypipe.pipeline.live import Reporter, report
from raypipe.pipeline.stages import (
    CalibrationTarget,
    PassiveCalibration,
    ProjectStage,
    _frame,
    _rows,
    claim_calibration,
    put_scores,
    require,
    stage_vectors,
)
from raypipe.store.vectors import VectorSpec

TP_STORE_PREFIX = "raypipe-tp-"  # the gang's rendezvous files (engine/tp.init_distributed)


class _Rank:
    """One rank actor: picks the rendezvous port (rank 0), then holds a TPProjector, and on
    rank 0 of the collecting replica the calibration collector (residuals are replicated)."""

    def __init__(self):
        self.engine = None
        self.collector = None

    def free_port(self) -> int:
        from raypipe.engine.tp import free_port

        return free_port()

    def store_path(self) -> str:
        """A file name no gang has used, in this node's temp folder: the gang's ranks share
        the node (they meet on 127.0.0.1) and so the folder. Rank 0 removes it when the gang
        closes; a gang killed with its run leaves it (2 KB), removed here a day later."""
        import tempfile
        import time
        import uuid
        from pathlib import Path

        from raypipe.store.atomic import STALE_TEMP_S

        folder = Path(tempfile.gettempdir())
        for old in folder.glob(f"{TP_STORE_PREFIX}*"):
            try:
                if time.time() - old.stat().st_mtime > STALE_TEMP_S:
                    old.unlink()
            except OSError:
                pass  # another gang's, or gone already
        return str(folder / f"{TP_STORE_PREFIX}{uuid.uuid4().hex}")

    def setup(self, **kwargs) -> None:
        from raypipe.engine.tp import TPProjector

        self.engine = TPProjector(**kwargs)

    def start_calibration(self, budget: int, state: dict | None) -> None:
        """Rank 0: a collector on the sharded model, going on from `state` when there is one."""
        from raypipe.engine.calibration import CalibrationCollector

        self.collector = CalibrationCollector(self.engine.model, budget=budget)
        if state is not None:
            self.collector.load_state_dict(state)

    def project(self, seqs: list[list[int]], collecting: bool):
        """Rank 0: (scores, (result, state, done) when `collecting`); other ranks: None.
        `collecting` is the same on every rank (TPProjector.project turns the early stop off)."""
        counting = collecting and self.collector is not None
        if counting:
            self.collector.attach()
        try:
            out = self.engine.project(seqs, collecting)
        finally:
            if counting:
                self.collector.detach()
        if out is None:
            return None
        c = self.collector
        return out[0], ((c.result(), c.state_dict(), c.done) if counting else None)

    def close(self) -> None:
        self.collector = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None


class TPProjectStage:
    """ProjectStage's contract, with the model sharded over `tp` actors in a placement group.

    The stage itself only coordinates (no model, no accelerator): every batch goes to all
    ranks at once, since each rank runs the same forward on its shard, and rank 0's scores
    come back. The gang fate-shares with the stage: actors and placement group go when it
    does, and a failed rank takes the whole gang down (its peers would wait forever in a
    collective), to be rebuilt on the next batch.
    """

    NEEDS = ProjectStage.NEEDS
    SCORE_COLUMNS = ProjectStage.SCORE_COLUMNS

    def __init__(
        self,
        spec: ModelSpec,
        vectors: tuple[VectorSpec, ...],
        component: str,
        massive_dims: tuple[int, ...] | None,
        max_batch_tokens: int,
        early_stop: bool = True,
        threads: int | None = None,
        calibration: CalibrationTarget | None = None,
        tp: int = 2,
        gpus_per_rank: float | None = None,
        ready_timeout_s: float = 600.0,
        compile_prefill: bool = False,
        progress: Reporter | None = None,
    ):
        if tp < 1:
            raise RaypipeError(f"stage project: tp must be at least 1, got {tp}")
        if compile_prefill:  # InferOptions refuses the pair first; a DTensor block is not tested
            raise RaypipeError("stage project: compile_prefill does not combine with tp > 1")
        self.tp = tp
        self.progress = progress
        self.gpus_per_rank = gpus_per_rank
        self.ready_timeout_s = ready_timeout_s
        self.setup_args = dict(
            world=tp,
            spec=spec,
            vectors=stage_vectors(spec, vectors),  # to the ranks by a method call
            component=component,
            massive_dims=massive_dims,
            max_batch_tokens=max_batch_tokens,
            early_stop=early_stop,
            threads=threads,
        )
        self.claim = claim_calibration(calibration)  # one collecting replica (see there)
        self.calibration = PassiveCalibration(calibration) if self.claim is not None else None
        self.collecting = self.calibration is not None
        self.pg = None
        self.actors: list = []
        self._start()

    def _bundle(self) -> dict[str, float]:
        import ray

        gpus = self.gpus_per_rank
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        # One whole GPU per rank: NCCL refuses two ranks on one device.
        return {"GPU": 1, "CPU": 1} if gpus else {"CPU": 0.5}

    def _start(self) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = self._bundle()
        # STRICT_PACK: one node, so the ranks meet on loopback and NCCL stays intra-node.
        self.pg = placement_group([bundle] * self.tp, strategy="STRICT_PACK")
        ready, _ = ray.wait([self.pg.ready()], timeout=self.ready_timeout_s)
        if not ready:
            self.close()
            raise RaypipeError(
                f"stage project: no node could hold {self.tp} x {bundle} for --tp "
                f"{self.tp} within {self.ready_timeout_s:.0f} s"
            )
        rank_actor = ray.remote(_Rank)
        self.actors = [
            rank_actor.options(
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.pg, placement_group_bundle_index=i
                ),
            ).remote()
            for i in range(self.tp)
        ]
        first = self.actors[0]
        port, store = self._gather([first.free_port.remote(), first.store_path.remote()])
        self._gather(
            [
                a.setup.remote(
                    rank=i, master_addr="127.0.0.1", port=port, store_path=store, **self.setup_args
                )
                for i, a in enumerate(self.actors)
            ]
        )
        if self.collecting:
            # A gang rebuilt after a failure goes on from the last state saved; one rebuilt
            # after the calibration finished does not collect again.
            cal = self.calibration
            self._gather([self.actors[0].start_calibration.remote(cal.target.budget, cal.state)])

    def _gather(self, refs: list) -> list:
        """ray.get on every rank, but on the first failure tear the gang down at once."""
        import ray

        pending, by_ref = list(refs), {r: i for i, r in enumerate(refs)}
        out: list = [None] * len(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            try:
                out[by_ref[done[0]]] = ray.get(done[0])
            except Exception:
                self.close()
                raise
        return out

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        require(batch, "project", self.NEEDS)
        rows = _rows(batch)
        todo = [r for r in rows if r["project"] and r["error"] is None]
        for row in rows:
            for col in self.SCORE_COLUMNS:
                row[col] = None
        if todo and not self.actors:
            self._start()
        fresh = self.calibration.fresh(todo) if self.collecting else [False] * len(todo)
        # As ProjectStage: prompts the calibration has not counted go through with the
        # collector on, then the others with it off; each call reaches every rank.
        for counting in (True, False):
            part = [r for r, f in zip(todo, fresh) if f == counting]
            if not part:
                continue
            seqs = [list(map(int, r["token_ids"])) for r in part]
            scores, calib = self._gather([a.project.remote(seqs, counting) for a in self.actors])[0]
            put_scores(part, scores)
            if calib is not None:
                self._save_calibration(part, *calib)
        if todo:
            report(self.progress, batch).set(flush=True, projected=len(todo))
        return _frame(rows, tuple(batch.columns) + self.SCORE_COLUMNS)

    def _save_calibration(self, rows: list[dict], result: dict, state: dict, done: bool) -> None:
        """As ProjectStage: rewritten after each batch, with the shared rule for "complete"."""
        if self.calibration.save(result, state, rows, done):
            self.collecting = False
            self.claim.close()
            self.claim = None

    def close(self) -> None:
        """Leave the process group on every rank, then kill the actors and free the bundles."""
        import ray

        actors, self.actors = self.actors, []
        if actors:
            # Bounded: a rank stuck in a collective never answers; it is killed below anyway.
            ray.wait([a.close.remote() for a in actors], num_returns=len(actors), timeout=10)
            for a in actors:
                ray.kill(a)
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            self.pg = None

    def __del__(self):
        try:
            import ray

            if ray.is_initialized():
                self.close()
        except Exception:
            pass  # interpreter shutdown: Ray reclaims the gang with its owner anyway

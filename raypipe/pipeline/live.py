"""Live progress from the workers to the driver's bar, between the output batches.

The driver owns a small actor, the board. Every stage is given a Reporter (its handle; Ray
pickles it into each actor, and again into one it restarts) and tells the board how far it got
with the batch in hand: tokens generated, prompts generated, projected, captured. Each report
is fire-and-forget (`num_returns=0`: no object to wait for, none left behind to log as an
unhandled error), at most every REPORT_EVERY_S per batch, and a stage never waits on it nor
fails by it: a board that is gone (a run killed while a model server still works on its batch)
only loses the reports. The console's clock asks the board for what changed (LiveView.poll).

A report carries the batch's counts so far, not increments, keyed by the batch's prompts: a
batch that Ray runs again (its actor died) overwrites its own entry, so nothing is counted
twice. The live numbers are only shown; the run's final counts are its output rows'.
"""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

REPORT_EVERY_S = 0.5
POLL_TIMEOUT_S = 2.0
CATCH_UP_S = 2.0  # how long the driver waits for the reports of rows it already holds


class Board:
    """The actor: the latest counts of every batch, and which changed since a version."""

    def __init__(self) -> None:
        self.epoch = uuid.uuid4().hex  # a restarted board starts empty: the viewer sees a new one
        self.version = 0
        self.batches: dict[str, dict[str, float]] = {}
        self.changed: dict[str, int] = {}  # batch key -> version of its last report

    def report(self, key: str, counts: dict[str, float]) -> None:
        self.version += 1
        self.batches.setdefault(key, {}).update(counts)
        self.changed[key] = self.version

    def since(self, version: int) -> tuple[str, int, dict[str, dict[str, float]]]:
        """(epoch, version now, {key: counts} of the batches reported after `version`)."""
        news = {k: self.batches[k] for k, v in self.changed.items() if v > version}
        return self.epoch, self.version, news


def start_board():
    """The run's board, on the driver's node, owned by the driver (it goes with it). Ray
    restarts it should it die; reports sent meanwhile are lost, never retried."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    return (
        ray.remote(Board)
        .options(
            num_cpus=0,
            max_restarts=-1,
            max_task_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
        )
        .remote()
    )


def stop_board(board) -> None:
    import ray

    ray.kill(board, no_restart=True)


def batch_key(batch) -> str:
    """The same for every try of a batch, in every stage it goes through."""
    sets = batch["prompt_set"] if "prompt_set" in batch.columns else [""] * len(batch)
    ids = sorted(f"{s}\0{i}" for s, i in zip(sets, batch["prompt_id"]))
    return hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]


class Reporter:
    """A stage's side: `batch(df)` for the batch in hand, then `.set(**counts)` as it goes."""

    def __init__(self, board) -> None:
        self.board = board

    def batch(self, batch) -> BatchReport:
        return BatchReport(self, batch_key(batch))

    def send(self, key: str, counts: dict[str, float]) -> None:
        if self.board is None:
            return
        try:
            self.board.report.options(num_returns=0).remote(key, counts)
        except Exception:  # noqa: BLE001 - progress is advisory: the run goes on without it
            self.board = None


class BatchReport:
    """One batch's counts so far, sent at most every REPORT_EVERY_S (and on `flush`)."""

    def __init__(self, reporter: Reporter | None, key: str) -> None:
        self.reporter, self.key = reporter, key
        self.counts: dict[str, float] = {}
        self.last = 0.0

    def set(self, flush: bool = False, **counts: float) -> None:
        self.counts.update(counts)
        now = time.monotonic()
        if flush or now - self.last >= REPORT_EVERY_S:
            self.last = now
            if self.reporter is not None:
                self.reporter.send(self.key, dict(self.counts))


def report(progress: Reporter | None, batch) -> BatchReport:
    """A stage's BatchReport for `batch`; one that sends nothing when the stage has no
    reporter (a stage called outside a run)."""
    if progress is None:
        return BatchReport(None, "")
    return progress.batch(batch)


class LiveView:
    """The driver's side: the totals over every batch, kept across a board restart (the
    entries seen before it stay; later reports update them)."""

    def __init__(self, board) -> None:
        self.board = board
        self.epoch: str | None = None
        self.version = 0
        self.batches: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()  # the clock and the driver's loop both ask

    def poll(self, timeout: float = POLL_TIMEOUT_S) -> dict[str, float] | None:
        """{kind: total}, or None when the board does not answer in time."""
        with self._lock:
            return self._poll(timeout)

    def _poll(self, timeout: float) -> dict[str, float] | None:
        import ray

        try:
            epoch, version, news = ray.get(self.board.since.remote(self.version), timeout=timeout)
            if epoch != self.epoch and self.epoch is not None:  # restarted: all it has is new
                epoch, version, news = ray.get(self.board.since.remote(0), timeout=timeout)
        except (ray.exceptions.RayError, TimeoutError):
            return None
        self.epoch, self.version = epoch, version
        for key, counts in news.items():
            self.batches.setdefault(key, {}).update(counts)
        totals: dict[str, float] = {}
        for counts in self.batches.values():
            for kind, n in counts.items():
                totals[kind] = totals.get(kind, 0) + n
        return totals


# A prompt's projection against its generation, for the share of the work done (`make demo`,
# CPU: 40 prompts generated in 26 s, projected on 6 traits with calibration in 12 s).
PROJECT_WEIGHT = 0.3


@contextmanager
def watch(bar, summary, generate: int, then: str | None, then_n: int) -> Iterator[Tracker]:
    """A run's board, and the bar watching it, until the run ends (before Ray does)."""
    board = start_board()
    try:
        shown = Tracker(Reporter(board), LiveView(board), summary, generate, then, then_n)
        with bar.watching(shown.poll):
            yield shown
    finally:
        stop_board(board)


class Tracker:
    """The bar's fields and share of work done: the output rows' counts (`summary`, a
    job.Summary), lifted by the workers' live ones while they are further along. `then` names
    the model stage's count (projected, captured), over `then_n` prompts."""

    def __init__(
        self,
        reporter: Reporter | None,
        view: LiveView | None,
        summary,
        generate: int,
        then: str | None,
        then_n: int,
    ):
        self.reporter = reporter  # for the stages
        self.view, self.summary = view, summary
        self.generate, self.then, self.then_n = generate, then, then_n  # then: a field name
        self.totals: dict[str, float] = {}
        # The generation rate runs from the last look with no token yet to the last look that
        # found more: it holds still while the prompts are projected and written.
        self.idle_until = self.moved_at = time.monotonic()
        self.tokens = 0

    def poll(self) -> tuple[dict[str, object], float | None] | None:
        """For the console's clock (Progress.watching)."""
        totals = self.view.poll() if self.view is not None else None
        if not totals:  # no answer, or no report yet: the bar keeps its phase
            if not self.totals.get("tokens"):
                self.idle_until = time.monotonic()
            return None
        self.totals = totals
        return self._fields()

    def fields(self) -> tuple[dict[str, object], float | None]:
        """For the driver's loop, after each output batch: its rows came through generation,
        whose last report (their tokens with them) was sent before they left the stage; wait
        a moment for it to land, so the bar's new tokens include those of the rows it counts
        (the clock's last look may be up to a tick old)."""
        deadline = time.monotonic() + CATCH_UP_S
        while self.view is not None and time.monotonic() < deadline:
            totals = self.view.poll(timeout=CATCH_UP_S)
            if totals is None:
                break  # the board does not answer: the rows' numbers alone, at once
            self.totals = totals or self.totals
            if self.totals.get("generated", 0) >= self.summary.generated:
                break
            time.sleep(0.05)
        return self._fields()

    def _fields(self) -> tuple[dict[str, object], float | None]:
        s, live = self.summary, self.totals
        fields: dict[str, object] = {}
        generated = max(s.generated, int(live.get("generated", 0)))
        gen_work = min(self.generate, max(generated, live.get("gen_work", 0.0)))
        then = min(self.then_n, max(s.done, int(live.get(self.then or "", 0))))
        if self.generate:
            fields["generated"] = generated
        if self.then:
            fields[self.then] = then
        fields["failed"] = s.failed
        tokens, now = int(live.get("tokens", 0)), time.monotonic()
        if not tokens:
            self.idle_until = now
            rate = s.tokens_per_second  # no generation seen: the rows' tokens through the prefill
        else:
            if tokens != self.tokens:
                self.tokens, self.moved_at = tokens, now
            fields["new_tokens"] = f"{tokens:,}"
            rate = tokens / max(self.moved_at - self.idle_until, 1e-3)
        fields["tok/s"] = f"{rate:,.0f}"
        whole = self.generate + PROJECT_WEIGHT * self.then_n
        work = (gen_work + PROJECT_WEIGHT * then) / whole if whole else None
        return fields, work

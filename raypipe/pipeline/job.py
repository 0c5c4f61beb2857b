"""Builds and runs the Ray Data job: read -> generate -> write responses -> project -> write."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from raypipe.engine.models import resolve_model_path
from raypipe.errors import user_error
from raypipe.options import RunOptions
from raypipe.pipeline import console, live, localray
from raypipe.pipeline.backends import Job, backend_for
from raypipe.pipeline.plan import InferPlan
from raypipe.pipeline.source import ROW_COLUMNS, prompt_dataset
from raypipe.pipeline.spine import BACKENDS, check_chain, run_stages
from raypipe.store.atomic import sweep_temp_files
from raypipe.store.calibration import mark_complete
from raypipe.store.parquet import TABLES, TableFold, build_parquet, compact, projection_traits
from raypipe.store.runlock import run_lock


@dataclass
class Summary:
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: int = 0
    generated: int = 0
    tokens: int = 0
    seconds: float = 0.0
    failures: list[tuple[str, str]] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    # (seconds since the pipeline started, tokens done so far) at each finished output batch
    timeline: list[tuple[float, int]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@contextmanager
def ray_session(run: RunOptions) -> Iterator[None]:
    """Ray for one run: this process's own on loopback, or a cluster it is told to join.
    Afterwards the watch on a joined cluster stops, and the connection is shut down unless
    it was given with --address (or Ray was up before the run)."""
    import ray

    if ray.is_initialized():
        _configure_data(run)
        yield
        return
    # Workers' output comes to this driver, whose console sends it to the run's log file.
    kwargs = dict(log_to_driver=True, logging_level="WARNING", runtime_env=_WORKER_ENV)
    joined = None
    env_address = os.environ.get("RAY_ADDRESS", "")
    if run.address and run.address != "local":
        joined = (run.address, "--address")
    elif env_address and env_address != "local" and not run.address:
        joined = (env_address, "$RAY_ADDRESS")
    elif run.backend == "auto":
        # A model server lives on a running cluster: the one `ray start` runs on this machine.
        # Never another driver's private Ray (`address="auto"` would join that too).
        address = localray.started_cluster()
        if address is not None:
            joined = (address, "the `ray start` cluster on this machine")
    over = None
    if joined is not None:
        address, source = joined
        localray.join(address, source, **kwargs)
        over = localray.watch_cluster(address)
        if not run.address:
            log(f"joined the Ray cluster at {address} ({source})", run.quiet)
    else:
        # Loopback only: a local run never listens on, or talks to, any other address.
        reaped = localray.init_local(**kwargs)
        if reaped:
            log(f"stopped {len(reaped)} Ray process(es) left by a killed run", run.quiet)
    try:
        _configure_data(run)
        yield
    except KeyboardInterrupt:
        if over is not None and over.gone:
            raise localray.gone_error(joined[0]) from None
        raise
    finally:
        if over is not None:
            over.set()
        if not run.address:
            ray.shutdown()


_WORKER_ENV = {"worker_process_setup_hook": console.WORKER_SETUP_HOOK}


def _configure_data(run: RunOptions) -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = not run.quiet
    ctx.print_on_execution_start = False
    # A stage's own error (a full disk, raypipe's errors) reaches the driver as itself, so the
    # CLI can print it in one line; Ray Data would wrap it in a UserCodeException whose cause
    # is lost on the way.
    ctx.raise_original_map_exception = True
    # ...and Ray Data then logs it as a Ray-internal error, traceback and all: keep those off
    # the console (its log file still gets them) when the CLI is about to print it.
    console = [h for h in logging.getLogger("ray.data").handlers if _is_console(h)]
    for handler in console:
        if not any(isinstance(f, _UserErrorFilter) for f in handler.filters):
            handler.addFilter(_UserErrorFilter())


def _is_console(handler) -> bool:
    return getattr(handler, "stream", None) in (sys.stderr, sys.stdout)


class _UserErrorFilter(logging.Filter):
    """Drops Ray Data's log records about an error that is raypipe's to report."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return exc is None or user_error(exc) is None


def _cluster_gpus() -> float:
    """GPUs per model actor when --gpus-per-replica is not given: one if the cluster shows any
    GPU now (an autoscaling cluster with none started yet shows none: hence the flag)."""
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def log(msg: str, quiet: bool = False) -> None:
    console.note(msg, quiet)  # above the progress bar, when one is up


def run_infer(plan: InferPlan) -> Summary:
    """The job `plan.opts.mode` names: stream (generate + project), capture (save raw
    activations), from_activations, generate. One run at a time writes a prompt set's
    outputs (a second one is refused)."""
    with run_lock(plan.paths, plan.variant, plan.prompts.name):
        return _run_infer(plan)


def _run_infer(plan: InferPlan) -> Summary:
    opts = plan.opts
    mode, project = opts.mode, opts.mode != "generate"
    run = opts.run
    for note in plan.notes:
        log(note, run.quiet)
    removed = sweep_temp_files(_output_folders(plan))
    if removed:
        log(f"removed {len(removed)} temp file(s) left by an interrupted run", run.quiet)
    # A killed run's finished parts go into the tables first: the stages read existing
    # responses from the table alone (with --json none).
    unreadable = _start_tables(plan)
    generate, project = plan.work()
    todo = len(generate | project)
    summary = Summary(total=len(plan.prompts.ids), skipped=len(plan.prompts.ids) - todo)
    # The workers write the tables' rows in parts as they go; the driver folds them into the
    # new tables while it waits for the next batch, so the end has only the last parts left.
    folds = [TableFold(plan.paths, plan.variant, plan.prompts.name, t) for t in TABLES]
    try:
        if todo:
            if mode != "from_activations":
                # Convert an alias once, here, rather than racing in every worker.
                resolve_model_path(plan.model.spec.model, plan.model.spec.cache_dir)
            progress = console.current().progress(
                todo, desc=plan.prompts.name, quiet=run.quiet, status="starting Ray"
            )
            then = {"generate": None, "capture": "captured"}.get(mode, "projected")
            with progress as bar, ray_session(run):
                bar.phase("waiting for the first batch")
                with live.watch(bar, summary, len(generate), then, todo) as shown:
                    _execute(plan, generate, project, summary, bar, folds, shown)
        tables = {fold.table: fold.finish() for fold in folds}
    finally:
        for fold in folds:  # a run that failed: its parts stay for the next one to fold
            fold.abandon()
    for err in unreadable:
        # Finished work elsewhere stays in the tables; the broken file is named, not fatal.
        summary.failed += 1
        summary.failures.append(("file", f"{err} (left out of Parquet; delete it to redo it)"))
    summary.outputs = {
        "responses": str(plan.paths.responses_dir(plan.variant, plan.prompts.name)),
        "projections": str(plan.paths.projections_root(plan.variant)),
        **{f"parquet:{k}": str(v[0]) for k, v in tables.items()},
    }
    if mode == "capture":
        comp = opts.projection.component
        raw = plan.paths.raw_file(plan.variant, comp, plan.prompts.name, "_").parent
        summary.outputs["raw"] = str(raw)
    return summary


def _start_tables(plan: InferPlan) -> list[str]:
    """Fold a killed run's parts in. Nothing is read back from the JSON files, but once: a
    tree whose tables were never written (its files came from trait-interp, or an older
    raypipe) gets them built from its files before its first run adds to them. Returns the
    files that could not be read (named as failures, left out)."""
    p, v, name = plan.paths, plan.variant, plan.prompts.name
    unreadable: list[str] = []
    never = not any(
        p.parquet_file(v, t, name).is_file() or p.parquet_parts(v, t, name).is_dir()
        for t in ("projections", "responses")
    )
    foreign = p.responses_dir(v, name).is_dir() or projection_traits(p, v, name)
    if never and foreign and plan.opts.output.json:
        build_parquet(p, v, name, unreadable)
    compact(p, v, name, create=False)
    return unreadable


def _output_folders(plan: InferPlan) -> list:
    """Every folder this prompt set's files are written into (and so its temp files too)."""
    p, v, name = plan.paths, plan.variant, plan.prompts.name
    traits = set(projection_traits(p, v, name)) | {vec.trait for vec in plan.vectors}
    return [
        p.responses_dir(v, name),
        *(p.projections_root(v) / t / name for t in sorted(traits)),
        p.raw_file(v, plan.opts.projection.component, name, "_").parent,
        p.parquet_file(v, "projections", name).parent,
        p.parquet_file(v, "responses", name).parent,
        p.parquet_parts(v, "projections", name),
        p.parquet_parts(v, "responses", name),
        p.calibration_file(v).parent,
    ]


def _served_by(plan: InferPlan) -> str | None:
    """--backend auto: the name of a model server up for this model, else None; says which."""
    from raypipe.pipeline.server import describe, find_server, server_name

    name = server_name(plan.model.spec)
    handle, info = find_server(plan.model.spec)
    if handle is None:
        log(
            f"backend auto: {info}; loading the model locally "
            f"(`raypipe serve --experiment {plan.paths.experiment}` keeps one loaded)",
            plan.opts.run.quiet,
        )
        return None
    log(f"backend auto: using {describe(name, info)}", plan.opts.run.quiet)
    return name


FOLD_EVERY_S = 2.0  # how often the driver folds the workers' finished parts into the tables


def _length(ids) -> int:
    return 0 if ids is None or (isinstance(ids, float) and ids != ids) else len(ids)


def _execute(
    plan: InferPlan, generate: frozenset, project: frozenset, summary: Summary, bar, folds, shown
) -> None:
    run = plan.opts.run
    job = Job(
        plan=plan,
        mode=plan.opts.mode,
        gpus=run.gpus_per_replica if run.gpus_per_replica is not None else _cluster_gpus(),
        generates=bool(generate),
        served=_served_by(plan)
        if run.backend == "auto" and plan.opts.mode != "from_activations"
        else None,
        progress=shown.reporter,
    )
    stages = BACKENDS[backend_for(job)](job)
    check_chain(stages, ROW_COLUMNS)
    # Ray Data's actor pools restart dead actors and retry their tasks (max_restarts=-1,
    # max_task_retries=-1 by default), so a killed worker costs no rows.
    ds = run_stages(prompt_dataset(plan.prompts, generate, project), stages)
    calibration = plan.calibration if job.then == "project" else None
    start = time.perf_counter()
    seen, folded = 0, start
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        # The summary columns, counted per column: a few small values per prompt.
        seen += len(batch)
        if "status" in batch:
            status = batch["status"]
        else:  # a generation-only job's rows: failed where they hold an error
            status = batch["error"].notna().map({True: "failed", False: "done"})
        failed, done = status == "failed", status == "done"
        summary.failed += int(failed.sum())
        summary.failures += zip(batch["prompt_id"][failed], batch["error"][failed], strict=True)
        summary.skipped += int((status == "skipped").sum())
        summary.done += int(done.sum())
        if "n_tokens" in batch:
            summary.tokens += int(batch["n_tokens"][done].fillna(0).sum())
        else:
            summary.tokens += int(batch["token_ids"][done].map(_length).sum())
        summary.generated += int(batch["generated"].fillna(False).astype(bool).sum())
        summary.seconds = time.perf_counter() - start
        summary.timeline.append((summary.seconds, summary.tokens))
        fields, work = shown.fields()  # the rows' counts (and the workers' while further)
        bar.update(seen, work=work, **fields)
        if time.perf_counter() - folded > FOLD_EVERY_S:
            for fold in folds:
                fold.step()
            folded = time.perf_counter()
    if calibration is not None:
        mark_complete(calibration.path)  # every prompt of the run was seen

"""Ray Data stages: each builds its engine object in __init__ and maps one batch in __call__."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from raypipe.engine.generate import GenerationOptions
from raypipe.engine.models import ModelSpec
from raypipe.errors import RaypipeError
from raypipe.pipeline.live import Reporter, report
from raypipe.store.atomic import write_json_files
from raypipe.store.calibration import CalibrationTarget
from raypipe.store.outputs import (
    VectorInfo,
    merged_projection,
    projection_entry,
    projection_record,
    read_response,
    response_record,
)
from raypipe.store.parquet import projection_rows, response_row, stored_responses, write_part
from raypipe.store.paths import ExperimentPaths
from raypipe.store.vectors import VectorSpec, load_vectors

RESPONSE_COLUMNS = ("prompt_text", "response_text", "token_ids", "prompt_end", "tokens")
# Of a response loaded from its file, for the table: a generated one gets them when written.
RESPONSE_EXTRAS = ("capture_date", "inference_model")


def require(batch: pd.DataFrame, stage: str, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in batch.columns]
    if missing:
        raise RaypipeError(
            f"stage {stage}: missing columns {missing}; present: {sorted(batch.columns)}"
        )


def load_for_stage(spec: ModelSpec, threads: int | None = None) -> tuple:
    """(model, tokenizer) for a stage's actor: loaded on the node's cores (Ray sets
    OMP_NUM_THREADS to the actor's CPU share, often 1), then run on `threads` (--threads), or
    on as many as the model is worth (models.use_threads: one for a tiny model on the CPU)."""
    import os

    import torch

    from raypipe.engine.models import load_model, use_threads

    torch.set_num_threads(threads or os.cpu_count() or 1)
    loaded = load_model(spec)
    use_threads(loaded[0], threads)
    return loaded


def _rows(batch: pd.DataFrame) -> list[dict]:
    # pandas holds a missing string as NaN (its `str` dtype): stages test for None. No column
    # holds a float scalar, so a float NaN is always a missing value.
    return [
        {k: None if isinstance(v, float) and v != v else v for k, v in row.items()}
        for row in batch.to_dict("records")
    ]


def _frame(rows: list[dict], columns: tuple[str, ...]) -> pd.DataFrame:
    return pd.DataFrame({c: [r.get(c) for r in rows] for c in columns})


@dataclass(frozen=True)
class ResponseSource:
    """Where a stage finds and writes response files."""

    paths: ExperimentPaths
    variant: str
    model_name: str
    json: bool = True  # per-prompt files as well as the table's parts


class GenerateStage:
    """Generates responses for rows marked `generate`; loads the existing file for the rest."""

    NEEDS = ("prompt_set", "prompt_id", "text", "system_prompt", "note", "generate", "project")
    PRODUCES = NEEDS + RESPONSE_COLUMNS + RESPONSE_EXTRAS + ("generated", "error")

    def __init__(
        self,
        spec: ModelSpec,
        opts: GenerationOptions,
        chat_config: bool | None,
        context: int,
        truncate: bool,
        source: ResponseSource,
        threads: int | None = None,
        backend: str = "local",
        tensor_parallel_size: int = 1,
        loaded: tuple | None = None,
        progress: Reporter | None = None,
    ):
        self.spec, self.opts, self.chat_config = spec, opts, chat_config
        self.progress = progress
        self.loaded = loaded  # (model, tokenizer) a model server already holds
        self.context, self.truncate, self.source, self.threads = context, truncate, source, threads
        self.backend, self.tensor_parallel_size = backend, tensor_parallel_size
        self.responder = None  # loaded on the first row that needs generation

    def _engine(self):
        if self.responder is None and self.backend == "vllm":
            from raypipe.engine.vllm_backend import VLLMResponder

            self.responder = VLLMResponder(
                self.spec,
                self.opts,
                self.chat_config,
                self.context,
                self.truncate,
                tensor_parallel_size=self.tensor_parallel_size,
            )
        if self.responder is None:
            from raypipe.engine.generate import uses_chat_template
            from raypipe.engine.respond import Responder

            if self.loaded is None:
                self.loaded = load_for_stage(self.spec, self.threads)
            model, tok = self.loaded
            self.responder = Responder(
                model,
                tok,
                self.opts,
                uses_chat_template(tok, self.chat_config),
                self.context,
                self.truncate,
            )
        return self.responder

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        require(batch, "generate", self.NEEDS)
        rows = _rows(batch)
        todo = []
        stored = self._stored([r for r in rows if not r["generate"]])
        for row in rows:
            row["error"], row["generated"] = None, False
            if not row["generate"]:
                rec = stored.get(row["prompt_id"])
                if rec is None:
                    todo.append(row)  # unreadable (or gone): generate it again, not fail
                    continue
                row.update(
                    prompt_text=rec["prompt"],
                    response_text=rec["response"],
                    token_ids=rec["token_ids"],
                    prompt_end=rec["prompt_end"],
                    tokens=rec["tokens"],
                    capture_date=rec.get("capture_date"),
                    inference_model=rec.get("inference_model"),
                )
            else:
                todo.append(row)
        if todo:
            live = report(self.progress, batch)
            results = self._respond(todo, live)
            for row, res in zip(todo, results):
                row.update(
                    prompt_text=res.prompt_text,
                    response_text=res.response_text,
                    token_ids=res.token_ids,
                    prompt_end=res.prompt_end,
                    tokens=res.tokens,
                    error=res.error,
                    generated=res.error is None,
                    project=res.error is None,
                )
            ok = [r for r in results if r.error is None]
            new = sum(len(r.token_ids) - r.prompt_end for r in ok)
            live.set(flush=True, generated=len(ok), tokens=new, gen_work=len(todo))
        return _frame(rows, self.PRODUCES)

    def _stored(self, rows: list[dict]) -> dict[str, dict]:
        """{prompt_id: response record} of the existing responses of `rows`: their JSON
        files, or, in a run that writes none, the responses table."""
        src = self.source
        if not rows:
            return {}
        if not src.json:
            ids = [r["prompt_id"] for r in rows]
            table = stored_responses(src.paths, src.variant, rows[0]["prompt_set"], ids)
            return {pid: {**r, "inference_model": r["model"]} for pid, r in table.items()}
        out = {}
        for row in rows:
            path = src.paths.response_file(src.variant, row["prompt_set"], row["prompt_id"])
            try:
                out[row["prompt_id"]] = read_response(path)
            except RaypipeError:
                pass
        return out

    def _respond(self, rows: list[dict], live):
        engine = self._engine()
        items = [(r["text"], r["system_prompt"]) for r in rows]
        try:
            if self.backend == "local":  # HF: the count moves as it decodes
                return engine.respond(items, lambda new, done: live.set(tokens=new, gen_work=done))
            return engine.respond(items)
        except Exception:
            if len(items) == 1:
                raise
        # One bad row must not sink the batch: retry one by one, recording each failure.
        out = []
        for item in items:
            try:
                out.extend(engine.respond([item]))
            except Exception as e:
                from raypipe.engine.respond import Response

                out.append(Response("", "", [], 0, [], error=f"{type(e).__name__}: {e}"))
        return out


def write_responses(batch: pd.DataFrame, source: ResponseSource) -> pd.DataFrame:
    """Persist new responses right away (a later crash never costs a finished generation): the
    table's part first, then the JSON files (a crash between them leaves a row to redo, never a
    file the table lacks). Loaded responses go into the part too, so a tree whose responses
    came from elsewhere (trait-interp) gets its table."""
    require(batch, "write_responses", GenerateStage.PRODUCES)
    rows, files = [], []
    for row in _rows(batch):
        if row["error"] or row["token_ids"] is None:
            continue
        record = response_record(
            prompt=row["prompt_text"],
            response=row["response_text"],
            system_prompt=row["system_prompt"],
            tokens=list(row["tokens"]),
            token_ids=list(row["token_ids"]),
            prompt_end=row["prompt_end"],
            model=source.model_name if row["generated"] else row["inference_model"],
            note=row["note"],
        )
        if not row["generated"]:
            record["capture_date"] = row["capture_date"]
        elif source.json:
            files.append((row, record))
        rows.append(response_row(record, row["prompt_id"], row["prompt_set"]))
    if rows:
        write_part(
            source.paths,
            source.variant,
            "responses",
            rows[0]["prompt_set"],
            rows,
            [True] * len(rows),
        )
    write_json_files(
        [
            (source.paths.response_file(source.variant, r["prompt_set"], r["prompt_id"]), record)
            for r, record in files
        ]
    )
    return batch


def claim_calibration(target: CalibrationTarget | None):
    """An open lock file when this process is the one replica that collects the calibration,
    else None. The lock (flock) goes with the process: a replica that dies frees it, and the
    actor Ray restarts in its place claims it again. Without it every replica collected its
    own partial sample and the last one to write won."""
    import fcntl

    if target is None:
        return None
    target.path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(target.path.parent / f".{target.path.name}.lock", "w")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


class PassiveCalibration:
    """The collecting replica's side of passive calibration (SPEC 8), shared by ProjectStage
    and TPProjectStage: which prompts the collector has counted, and the files.

    The count goes on across runs: a run killed part way leaves its running state beside the
    partial calibration.json, and the next run starts from it, counting only prompts it has
    not counted (the plan sends those through the prefill even where their projections are
    complete). So the calibration comes out the same whatever the crash history.
    """

    def __init__(self, target: CalibrationTarget):
        from raypipe.store.calibration import read_state

        self.target = target
        saved = read_state(target)
        self.state = saved["collector"] if saved else None  # CalibrationCollector.state_dict()
        self.counted = {tuple(k) for k in saved["counted"]} if saved else set()
        self.sources = list(saved["sources"]) if saved else []
        if target.source not in self.sources:
            self.sources.append(target.source)

    def fresh(self, rows: list[dict]) -> list[bool]:
        """Per row: not counted yet (a row counted by a killed run, or by an earlier try of this
        batch, must not be counted twice)."""
        return [(self.target.prompt_set, str(r["prompt_id"])) not in self.counted for r in rows]

    def save(self, result: dict, state: dict, counted_rows: list[dict], done: bool) -> bool:
        """After a batch whose `counted_rows` the collector saw: calibration.json, then the
        running state. True when the calibration is complete (its budget filled, or every
        prompt of the run counted): then the state goes and the claim can be let go."""
        from raypipe.store.calibration import calibration_record, write_calibration, write_state

        t = self.target
        self.counted.update((t.prompt_set, str(r["prompt_id"])) for r in counted_rows)
        self.state = state
        covered = bool(t.expected) and all((t.prompt_set, i) in self.counted for i in t.expected)
        complete = done or covered
        source = " + ".join(self.sources)
        write_calibration(
            t.path, calibration_record(t.experiment, t.model, t.variant, source, result), complete
        )
        if not complete:
            write_state(t, sorted(self.counted), self.sources, state)
        return complete


def stage_vectors(spec: ModelSpec, vectors) -> list[tuple[int, list[float]]]:
    """(layer, floats) for the projector, loaded here in the actor from the files the plan
    chose (small constructor arguments; a restarted actor reads the same checked bytes)."""
    from raypipe.engine.models import load_config, text_config

    hidden = int(text_config(load_config(spec.model, spec.cache_dir)).hidden_size)
    return load_vectors(vectors, hidden)


class ProjectStage:
    """One hooked prefill per batch over the exact ids; emits flat score arrays per row."""

    NEEDS = ("prompt_id", "token_ids", "project", "error")
    SCORE_COLUMNS = ("scores", "norms", "cleaned_scores", "cleaned_norms")

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
        loaded: tuple | None = None,
        compile_prefill: bool = False,
        progress: Reporter | None = None,
    ):
        from raypipe.engine.projector import Projector

        self.progress = progress
        if loaded is None:
            loaded = load_for_stage(spec, threads)
        model, tok = loaded
        self.projector = Projector(
            model,
            stage_vectors(spec, vectors),
            component=component,
            massive_dims=list(massive_dims) if massive_dims else None,
            early_stop=early_stop,
            max_batch_tokens=max_batch_tokens,
            pad_id=tok.pad_token_id or 0,
            compile=compile_prefill,
        )
        self.early_stop = early_stop
        self.claim = claim_calibration(calibration)  # held while this stage lives
        self.calibration = PassiveCalibration(calibration) if self.claim is not None else None
        self.collector = None
        if self.calibration is not None:
            from raypipe.engine.calibration import CalibrationCollector

            # Attached only while a batch of uncounted prompts projects: a served model also
            # generates in between, and counted prompts must not count again.
            self.collector = CalibrationCollector(model, budget=calibration.budget)
            if self.calibration.state is not None:
                self.collector.load_state_dict(self.calibration.state)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        require(batch, "project", self.NEEDS)
        rows = _rows(batch)
        todo = [r for r in rows if r["project"] and r["error"] is None]
        for row in rows:
            for col in self.SCORE_COLUMNS:
                row[col] = None
        fresh = [False] * len(todo)
        if self.collector is not None:
            fresh = self.calibration.fresh(todo)
        counting = [r for r, f in zip(todo, fresh) if f]
        if counting:
            put_scores(counting, self._project_counted(counting))
        rest = [r for r, f in zip(todo, fresh) if not f]
        if rest:
            put_scores(rest, self.projector.project(_seqs(rest)))
        if todo:
            report(self.progress, batch).set(flush=True, projected=len(todo))
        return _frame(rows, tuple(batch.columns) + self.SCORE_COLUMNS)

    def _project_counted(self, rows: list[dict]) -> list:
        """The rows' prefill with the calibration hooks on (every block: no early stop), then
        the calibration saved; rewritten after each batch, so a killed run leaves its count."""
        self.collector.attach()
        self.projector.early_stop = False
        try:
            results = self.projector.project(_seqs(rows))
        finally:
            self.collector.detach()
            self.projector.early_stop = self.early_stop
        c = self.collector
        if self.calibration.save(c.result(), c.state_dict(), rows, c.done):
            self.collector = None
            self.claim.close()  # done: a stage a model server keeps must not hold it on
            self.claim = None
        return results


def _seqs(rows: list[dict]) -> list[list[int]]:
    return [list(map(int, r["token_ids"])) for r in rows]


def put_scores(rows: list[dict], results: list) -> None:
    """A projector's SequenceScores into the rows' flat score columns."""
    for row, res in zip(rows, results):
        row["scores"], row["norms"] = res.scores.ravel(), res.norms.ravel()
        if res.cleaned_scores is not None:
            row["cleaned_scores"] = res.cleaned_scores.ravel()
            row["cleaned_norms"] = res.cleaned_norms.ravel()


class FusedStage:
    """Generation, then projection or capture, in one actor on one loaded model.

    Where both stages would share one device (a node's CPU cores, a single GPU), two actors
    only contend for it (and hold two copies of the model); running them in turn on each batch
    is what a plain loop does, with the pipeline's resume and writers around it.
    """

    def __init__(self, generate: dict, then: str, then_kwargs: dict, threads: int | None = None):
        loaded = load_for_stage(generate["spec"], threads)
        self.generate = GenerateStage(**generate, loaded=loaded)
        self.source = generate["source"]
        self.then = MODEL_STAGES[then](**then_kwargs, loaded=loaded)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        # Responses are on disk before projection starts: a crash never costs a generation.
        return self.then(write_responses(self.generate(batch), self.source))


@dataclass(frozen=True)
class ProjectionSink:
    """What the projection writer needs to lay out and label the files."""

    paths: ExperimentPaths
    variant: str
    vectors: tuple[VectorInfo, ...]
    component: str
    centered: bool
    force: bool
    massive_dims: tuple[int, ...] | None
    json: bool = True  # per-prompt files as well as the table's parts


SUMMARY_COLUMNS = ("prompt_id", "status", "generated", "n_tokens", "error")


@dataclass(frozen=True)
class CaptureSink:
    """Where the capture stage writes raw `.pt` files."""

    paths: ExperimentPaths
    variant: str
    component: str


class CaptureStage:
    """One hooked prefill per batch; writes the raw `.pt` files from the actor itself (they are
    large: passing them on to a writer stage would copy them through the object store)."""

    NEEDS = ("prompt_set", "prompt_id", "generated", "project", "error") + RESPONSE_COLUMNS

    def __init__(
        self,
        spec: ModelSpec,
        layers: list[int],
        max_batch_tokens: int,
        sink: CaptureSink,
        threads: int | None = None,
        loaded: tuple | None = None,
        compile_prefill: bool = False,
        progress: Reporter | None = None,
    ):
        from raypipe.engine.capture import Capturer

        self.progress = progress
        if loaded is None:
            loaded = load_for_stage(spec, threads)
        model, tok = loaded
        self.sink = sink
        self.capturer = Capturer(
            model,
            layers,
            sink.component,
            max_batch_tokens,
            tok.pad_token_id or 0,
            compile=compile_prefill,
        )

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        require(batch, "capture", self.NEEDS)
        rows = _rows(batch)
        todo = [r for r in rows if r["project"] and not r["error"]]
        acts = self.capturer.capture([list(r["token_ids"]) for r in todo]) if todo else []
        write_captures(self.sink, todo, acts)
        if todo:
            report(self.progress, batch).set(flush=True, captured=len(todo))
        return capture_summary(rows)


def write_captures(sink: CaptureSink, rows: list[dict], acts: list[dict]) -> None:
    """One raw `.pt` file per row, from its `{layer: (T, D)}` activations (HF or vLLM hooks)."""
    from raypipe.store.captures import build_capture, write_capture

    for row, layers in zip(rows, acts):
        path = sink.paths.raw_file(
            sink.variant, sink.component, row["prompt_set"], row["prompt_id"]
        )
        record = build_capture(
            prompt_text=row["prompt_text"],
            response_text=row["response_text"],
            tokens=list(row["tokens"]),
            token_ids=list(row["token_ids"]),
            prompt_end=int(row["prompt_end"]),
            activations=layers,
            component=sink.component,
        )
        write_capture(path, record)


def capture_summary(rows: list[dict]) -> pd.DataFrame:
    out = [
        {
            "prompt_id": r["prompt_id"],
            "status": "failed" if r["error"] else "done" if r["project"] else "skipped",
            "generated": bool(r["generated"]),
            "n_tokens": len(r["token_ids"]) if r["token_ids"] is not None else 0,
            "error": r["error"],
        }
        for r in rows
    ]
    return _frame(out, SUMMARY_COLUMNS)


# The stages that run on a loaded model, by kind: FusedStage and the model server build them.
MODEL_STAGES = {"generate": GenerateStage, "project": ProjectStage, "capture": CaptureStage}


def write_projections(batch: pd.DataFrame, sink: ProjectionSink) -> pd.DataFrame:
    """One JSON per prompt per trait. Entries the files hold already stay (all of them but
    the requested ones with --force; none for a regenerated response): update_projection."""
    require(
        batch,
        "write_projections",
        ("prompt_set", "prompt_id", "prompt_end", "generated") + ProjectStage.SCORE_COLUMNS,
    )
    out, files, table, replaces = [], [], [], []
    n_vec = len(sink.vectors)
    by_trait: dict[str, list[int]] = {}
    for i, info in enumerate(sink.vectors):
        by_trait.setdefault(info.trait, []).append(i)
    for row in _rows(batch):
        summary = {
            "prompt_id": row["prompt_id"],
            "generated": bool(row["generated"]),
            "n_tokens": len(row["token_ids"]) if row.get("token_ids") is not None else 0,
            "error": row.get("error"),
        }
        if row.get("error"):
            out.append({**summary, "status": "failed"})
            continue
        if row["scores"] is None:
            out.append({**summary, "status": "skipped"})
            continue
        scores = np.asarray(row["scores"], dtype=np.float32).reshape(n_vec, -1)
        norms = np.asarray(row["norms"], dtype=np.float32).reshape(n_vec, -1)
        cleaned = row.get("cleaned_scores")
        if cleaned is not None:
            cleaned = np.asarray(cleaned, dtype=np.float32).reshape(n_vec, -1)
            cleaned_norms = np.asarray(row["cleaned_norms"], dtype=np.float32).reshape(n_vec, -1)
        end = int(row["prompt_end"])
        wrote = False
        for trait, idx in by_trait.items():
            path = sink.paths.projection_file(
                sink.variant, trait, row["prompt_set"], row["prompt_id"]
            )
            entries = [
                projection_entry(
                    sink.vectors[i],
                    scores[i],
                    norms[i],
                    end,
                    sink.centered,
                    (cleaned[i], cleaned_norms[i], list(sink.massive_dims))
                    if cleaned is not None
                    else None,
                )
                for i in idx
            ]
            record = projection_record(
                prompt_id=row["prompt_id"],
                prompt_set=row["prompt_set"],
                n_prompt_tokens=end,
                n_response_tokens=scores.shape[1] - end,
                component=sink.component,
                position=sink.vectors[idx[0]].position,
                centered=sink.centered,
                entries=entries,
            )
            if sink.json:
                merged = merged_projection(path, record, sink.force, fresh=row["generated"])
                if merged is not None:
                    # The file's whole content, as the part's rows of this prompt and trait.
                    files.append((path, merged))
                    rows = projection_rows(merged, trait, row["prompt_id"], row["prompt_set"])
                    table += rows
                    replaces += [True] * len(rows)
                    wrote = True
            else:
                # No file to merge into: the run's entries, merged into the table by key
                # (a regenerated response's replace all of its old ones).
                rows = projection_rows(record, trait, row["prompt_id"], row["prompt_set"])
                table += rows
                replaces += [bool(row["generated"])] * len(rows)
                wrote = True
        # Projected only for the calibration (its files were complete): nothing new written.
        out.append({**summary, "status": "done" if wrote else "skipped"})
    # The table's part first, then the files: a crash between leaves rows to redo, never a file
    # the table lacks. Each part row stands for its file's whole content (`replaces`).
    if table:
        write_part(sink.paths, sink.variant, "projections", table[0]["prompt_set"], table, replaces)
    write_json_files(files)
    return _frame(out, SUMMARY_COLUMNS)

"""Validate every input and decide the work, before Ray starts or any model loads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from raypipe.engine.models import ModelSpec, load_config, text_config
from raypipe.errors import InputError
from raypipe.options import InferOptions, ModelOptions
from raypipe.store.calibration import (
    CalibrationTarget,
    calibration_complete,
    massive_dims,
    read_state,
)
from raypipe.store.captures import capture_components
from raypipe.store.experiment import ExperimentConfig, load_experiment
from raypipe.store.outputs import (
    ProjectionSettings,
    projection_contents,
    read_response,
    requested_entries,
)
from raypipe.store.parquet import SCHEMAS, current
from raypipe.store.paths import RECORD_SUFFIX, ExperimentPaths
from raypipe.store.prompts import PromptSet, load_prompt_set
from raypipe.store.vectors import VectorSpec, list_traits, parse_layers, resolve_vectors


@dataclass(frozen=True)
class ModelInfo:
    spec: ModelSpec
    n_layers: int
    hidden_size: int
    context: int


@dataclass(frozen=True)
class InferPlan:
    opts: InferOptions
    paths: ExperimentPaths
    config: ExperimentConfig
    variant: str
    model: ModelInfo
    prompts: PromptSet
    vectors: tuple[VectorSpec, ...]
    notes: tuple[str, ...]
    massive_dims: tuple[int, ...] | None
    calibration: CalibrationTarget | None  # None: complete already, or nothing is projected
    # What is left, per prompt id (the rows themselves are read by the job's workers):
    generate: frozenset[str]  # the responses to generate
    project: frozenset[str]  # the prompts the model stage is to run on (--capture: raw files)
    # trait -> ids of the prompts whose file lacks a requested (method, layer) entry
    missing: dict[str, tuple[str, ...]]

    def work(self) -> tuple[frozenset[str], frozenset[str]]:
        """(to generate, to send through the model stage) for this run's mode."""
        mode = self.opts.mode
        if mode == "from_activations":
            return frozenset(), self.project  # no model: nothing is generated
        if mode == "generate":
            return self.generate, frozenset()
        return self.generate, self.project


def model_info(model: str, lora: str | None, m: ModelOptions) -> ModelInfo:
    spec = m.spec(model, lora)
    try:
        cfg = text_config(load_config(model, m.cache_dir))
    except InputError:
        raise
    except Exception as e:
        raise InputError(model, "model", f"cannot read the model config: {e}") from None
    return ModelInfo(
        spec=spec,
        n_layers=int(cfg.num_hidden_layers),
        hidden_size=int(cfg.hidden_size),
        context=int(getattr(cfg, "max_position_embeddings", 0) or 0),
    )


def plan_serve(root: Path, experiment: str, m: ModelOptions) -> tuple[str, ModelInfo]:
    """(variant, model) a `raypipe serve` for this experiment holds: the application default."""
    paths = ExperimentPaths(root, experiment)
    variant = load_experiment(paths).variant(m.variant, "application")
    return variant.name, model_info(variant.model, variant.lora, m)


def _massive_dims(paths: ExperimentPaths, variant: str) -> tuple[int, ...]:
    return massive_dims(paths.calibration_file(variant))


def _calibration(
    paths: ExperimentPaths,
    variant: str,
    model: str,
    prompts: PromptSet,
    generate: frozenset[str],
    project: set[str],
) -> CalibrationTarget | None:
    """The calibration this run collects (SPEC 8: the first run of a variant), or None when it
    is complete. It goes on from a killed run's count: prompts it has not counted are added
    to `project`, up to the token budget, even where their projection files are complete
    (the writer leaves those files alone). Reads at most the budget's worth of responses."""
    path = paths.calibration_file(variant)
    if calibration_complete(path):
        return None
    target = CalibrationTarget(
        path=path,
        experiment=paths.experiment,
        model=model,
        variant=variant,
        source=f"raypipe infer:{prompts.name}",
        prompt_set=prompts.name,
        expected=frozenset(prompts.ids),
    )
    saved = read_state(target)
    counted = {tuple(k) for k in saved["counted"]} if saved else set()
    left = target.budget - (saved["collector"]["tokens_seen"] if saved else 0)
    for pid in prompts.ids:
        if left <= 0:
            break
        if (prompts.name, pid) in counted:
            continue
        if pid not in generate:
            # (One to generate has no length yet: counting it as none errs towards sending
            # more prompts than the budget needs, never fewer.)
            try:
                response = read_response(paths.response_file(variant, prompts.name, pid))
            except InputError:
                # Sent through, the generate stage would write it anew: not for calibration.
                continue
            left -= len(response["token_ids"])
        project.add(pid)
    return target


def _listing(folder: Path, suffix: str = RECORD_SUFFIX) -> set[str]:
    """The stems of the `*{suffix}` files in `folder`: one directory read, not a stat per id."""
    try:
        with os.scandir(folder) as it:
            return {e.name[: -len(suffix)] for e in it if e.name.endswith(suffix) and e.is_file()}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _uncaptured(paths: ExperimentPaths, variant: str, prompts: PromptSet, component: str) -> set:
    """--capture: the prompts whose raw file lacks `component` (one file holds every component
    it took); a file there is opened (memory-mapped) only to see which components it holds."""
    folder = paths.raw_file(variant, component, prompts.name, "_").parent
    files = _listing(folder, ".pt")
    return {
        i
        for i in prompts.ids
        if i not in files
        or component not in capture_components(paths.raw_file(variant, component, prompts.name, i))
    }


def _table(paths: ExperimentPaths, variant: str, table: str, prompt_set: str, cols, json_files):
    """`current()` of a table; one that cannot be read holds nothing where the files are the
    record (the files are read instead), and is a one-line error where it is the record."""
    try:
        return current(paths, variant, table, prompt_set, cols)
    except Exception as e:  # a damaged or foreign file where a table or part belongs
        if not json_files:
            where = paths.parquet_file(variant, table, prompt_set)
            why = f"not a readable Parquet table ({type(e).__name__}); with --json none it "
            raise InputError(where, table, why + "is the record of what exists") from None
        names = list(dict.fromkeys(["prompt_id", *cols]))
        schema = SCHEMAS[table]
        return pa.schema([schema.field(n) for n in names]).empty_table()


def _held(
    paths: ExperimentPaths, variant: str, prompt_set: str, requested: dict, json_files: bool
) -> dict:
    """trait -> (ids holding every requested entry, {other settings: ids holding entries under
    them}, ids with any row) from the projections table (its finished parts included): the
    same rule for "done" as a file's (ProjectionContents), computed on the columns at once."""
    cols = ["prompt_id", "trait", "method", "layer", "component", "centered", "position"]
    table = _table(paths, variant, "projections", prompt_set, cols, json_files)
    out = {}
    for trait, (settings, wanted) in requested.items():
        rows = table.filter(pc.equal(table["trait"], trait))
        ids = rows["prompt_id"]
        same = pc.and_(
            pc.and_(
                pc.equal(rows["component"], settings.component),
                pc.equal(rows["centered"], settings.centered),
            ),
            pc.equal(rows["position"], settings.position),
        )
        keys = pc.binary_join_element_wise(
            rows["method"], pc.cast(rows["layer"], pa.string()), "\x00"
        )
        wanted_keys = pa.array([f"{m}\x00{lay}" for m, lay in wanted])
        keep = pc.and_(same, pc.is_in(keys, value_set=wanted_keys))
        good = pa.table({"prompt_id": pc.filter(ids, keep), "key": pc.filter(keys, keep)})
        counts = good.group_by("prompt_id").aggregate([("key", "count_distinct")])
        full = pc.filter(counts["prompt_id"], pc.equal(counts["key_count_distinct"], len(wanted)))
        other: dict[ProjectionSettings, set[str]] = {}
        diff = rows.filter(pc.invert(same))
        for comp, centered, pos, pid in zip(
            *(diff[c].to_pylist() for c in ("component", "centered", "position", "prompt_id"))
        ):
            other.setdefault(ProjectionSettings(comp, bool(centered), pos), set()).add(pid)
        out[trait] = (set(full.to_pylist()), other, set(ids.unique().to_pylist()))
    return out


def _what_is_left(
    paths: ExperimentPaths,
    variant: str,
    prompts: PromptSet,
    requested: dict,
    dims: tuple[int, ...] | None,
    json_files: bool,
    regenerate: bool,
):
    """(ids to generate, trait -> ids missing a requested entry, {(trait, other settings):
    files}) with one rule: a response or projection exists when its file does (with --json
    none: when the tables hold it); what a projection file holds is read from the projections
    table, which the writers keep with the files, and from the file itself only where the
    table has no row for it (files trait-interp wrote, or cleaned scores the table lacks)."""
    ids = prompts.ids
    if regenerate:
        return frozenset(ids), {t: ids for t in requested}, {}
    if json_files:
        have = _listing(paths.responses_dir(variant, prompts.name))
    else:
        table = _table(paths, variant, "responses", prompts.name, ["prompt_id"], False)
        have = set(table["prompt_id"].to_pylist())
    generate = frozenset(i for i in ids if i not in have)
    held = _held(paths, variant, prompts.name, requested, json_files) if requested else {}
    missing: dict[str, tuple[str, ...]] = {}
    replaced: dict[tuple[str, ProjectionSettings | None], int] = {}
    for trait, (settings, wanted) in requested.items():
        full, other, in_table = held[trait]
        if json_files:
            files = _listing(paths.projections_dir(variant, trait, prompts.name))
        else:
            files = in_table
        # Cleaned scores are not in the table: a run that removes massive dims reads files.
        read = (files if dims else files - in_table) if json_files else set()
        done = set() if dims else (full & files)
        for pid in read & set(ids):
            contents = projection_contents(paths.projection_file(variant, trait, prompts.name, pid))
            if contents is None:
                continue
            if not contents.missing(settings, wanted, dims):
                done.add(pid)
            elif contents.settings != settings and pid not in generate:
                key = (trait, contents.settings)
                replaced[key] = replaced.get(key, 0) + 1
        for old, pids in other.items():
            n = len((pids & files) - generate - read)
            if n:
                replaced[(trait, old)] = replaced.get((trait, old), 0) + n
        missing[trait] = tuple(i for i in ids if i not in done)
    return generate, missing, replaced


def plan_infer(opts: InferOptions, need_vectors: bool = True) -> InferPlan:
    out = opts.output
    paths = ExperimentPaths(out.root, out.experiment)
    config = load_experiment(paths)
    prompts = load_prompt_set(paths.datasets, out.prompt_set)
    variant = config.variant(opts.model.variant, "application")
    extraction = config.extraction_variant
    info = model_info(variant.model, variant.lora, opts.model)
    opts.check_variant(info.spec)  # the option pairs that need the variant (its LoRA, its config)
    proj = opts.projection
    vectors, notes, dims = [], [], None
    if need_vectors:
        traits = list(proj.traits) if proj.traits is not None else list_traits(paths, extraction)
        if not traits:
            raise InputError(
                paths.extraction_dir(),
                "traits",
                f"no extracted trait vectors for variant {extraction!r}; run `raypipe extract`",
            )
        layers = parse_layers(proj.layers, info.n_layers)
        vectors, notes = resolve_vectors(
            paths,
            traits,
            extraction,
            proj.component,
            layers,
            info.n_layers,
            info.hidden_size,
            proj.method,
            # Steering results sit under the steered (application) variant, as trait-interp
            # keeps them; the extraction variant is the fallback.
            steering_variants=(variant.name, config.application_variant),
        )
        dims = _massive_dims(paths, variant.name) if proj.remove_massive_dims else None
    requested = requested_entries(vectors, proj.component, proj.centered)
    generate, missing, replaced = _what_is_left(
        paths, variant.name, prompts, requested, dims, out.json, out.regenerate
    )
    project: set[str] = set()
    if need_vectors:
        if opts.mode == "capture":
            if out.force:
                project = set(prompts.ids)
            else:
                project = set(generate) | _uncaptured(paths, variant.name, prompts, proj.component)
        elif out.force:
            project = set(prompts.ids)
        else:
            project = set(generate).union(*missing.values())
    calibration = None
    if need_vectors:
        calibration = _calibration(paths, variant.name, info.spec.model, prompts, generate, project)
    for (trait, old), n in replaced.items():
        new = requested[trait][0]
        had = old.differences(new) if old else "no stated settings"
        notes.append(
            f"{trait}: {n} projection file(s) hold entries with {had}; projecting with "
            f"{new.differences(old)} replaces those entries (one file holds one setting)"
        )
    return InferPlan(
        opts=opts,
        paths=paths,
        config=config,
        variant=variant.name,
        model=info,
        prompts=prompts,
        vectors=tuple(vectors),
        notes=tuple(notes),
        massive_dims=dims,
        calibration=calibration,
        generate=generate,
        project=frozenset(project),
        missing=missing,
    )

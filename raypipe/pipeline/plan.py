"""Validate every input and decide the work, before Ray starts or any model loads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raypipe.engine.models import ModelSpec, load_config, text_config
from raypipe.errors import InputError
from raypipe.options import InferOptions, ModelOptions
from raypipe.store.calibration import (
    CalibrationTarget,
    calibration_complete,
    massive_dims,
    read_state,
)
from raypipe.store.experiment import ExperimentConfig, load_experiment
from raypipe.store.outputs import (
    ProjectionContents,
    ProjectionSettings,
    projection_contents,
    read_response,
    requested_entries,
)
from raypipe.store.parquet import current
from raypipe.store.paths import ExperimentPaths
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
    rows: tuple[dict, ...]  # one per prompt: what the stages need and what is to be done
    # trait -> ids of the prompts whose file lacks a requested (method, layer) entry
    missing: dict[str, tuple[str, ...]]


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
    paths: ExperimentPaths, variant: str, model: str, prompts: PromptSet, rows: list[dict]
) -> CalibrationTarget | None:
    """The calibration this run collects (SPEC 8: the first run of a variant), or None when it
    is complete. It goes on from a killed run's count: prompts it has not counted are marked
    to project, up to the token budget, even where their projection files are complete (the
    writer leaves those files alone)."""
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
        expected=frozenset(item.id for item in prompts.items),
    )
    saved = read_state(target)
    counted = {tuple(k) for k in saved["counted"]} if saved else set()
    left = target.budget - (saved["collector"]["tokens_seen"] if saved else 0)
    for row in rows:
        if left <= 0:
            break
        if (prompts.name, row["prompt_id"]) in counted:
            continue
        if not row["generate"]:
            # (One to generate has no length yet: counting it as none errs towards sending
            # more prompts than the budget needs, never fewer.)
            try:
                response = read_response(
                    paths.response_file(variant, prompts.name, row["prompt_id"])
                )
            except InputError:
                # Sent through, the generate stage would write it anew: not for calibration.
                continue
            left -= len(response["token_ids"])
        row["project"] = True
    return target


def _stored(paths: ExperimentPaths, variant: str, prompt_set: str):
    """(response ids, {(prompt id, trait): ProjectionContents}) of the Parquet tables: the
    same rule for "done" as the files'; cleaned scores are not in the table, so a run that
    removes massive dims finds none held."""
    responses = current(paths, variant, "responses", prompt_set, ["prompt_id"])
    cols = ["prompt_id", "trait", "method", "layer", "component", "centered", "position"]
    table = current(paths, variant, "projections", prompt_set, cols).to_pydict()
    held: dict[tuple[str, str], list] = {}
    for pid, trait, method, layer, comp, centered, pos in zip(*(table[c] for c in cols)):
        settings = ProjectionSettings(comp, bool(centered), pos)
        held.setdefault((pid, trait), []).append((settings, (method, int(layer), None)))
    contents = {}
    for key, entries in held.items():
        # A (prompt, trait) in the table holds one setting, as a file does (the writer
        # replaced the others); should two meet, the entries of the latest one count.
        settings = entries[-1][0]
        kept = tuple(e for s, e in entries if s == settings)
        contents[key] = ProjectionContents(settings, kept)
    return set(responses.column("prompt_id").to_pylist()), contents


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
        )
        dims = _massive_dims(paths, variant.name) if proj.remove_massive_dims else None
    requested = requested_entries(vectors, proj.component, proj.centered)
    missing: dict[str, list[str]] = {t: [] for t in requested}
    replaced: dict[tuple[str, ProjectionSettings | None], int] = {}
    rows = []
    # Without JSON files the tables are the record of what exists.
    tables = None if out.json else _stored(paths, variant.name, prompts.name)
    for item in prompts.items:
        if tables is None:
            response = paths.response_file(variant.name, prompts.name, item.id)
            generate = out.regenerate or not response.is_file()
        else:
            generate = out.regenerate or item.id not in tables[0]
        todo = generate or out.force
        for trait, (settings, wanted) in requested.items():
            path = paths.projection_file(variant.name, trait, prompts.name, item.id)
            if out.regenerate:
                held = None
            elif tables is None:
                held = projection_contents(path)
            else:
                held = tables[1].get((item.id, trait))
            if held is None or held.missing(settings, wanted, dims):
                missing[trait].append(item.id)
                todo = True
            if held is not None and held.settings != settings and not generate:
                key = (trait, held.settings)
                replaced[key] = replaced.get(key, 0) + 1
        rows.append(
            {
                "prompt_set": prompts.name,
                "prompt_id": item.id,
                "text": item.text,
                "system_prompt": item.system_prompt,
                "note": item.note,
                "generate": generate,
                "project": need_vectors and todo,
            }
        )
    calibration = None
    # (vLLM's hooks return scores only: the HF prefill collects calibration, --backend local.)
    if need_vectors and opts.run.backend != "vllm":
        calibration = _calibration(paths, variant.name, info.spec.model, prompts, rows)
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
        rows=tuple(rows),
        missing={t: tuple(ids) for t, ids in missing.items()},
    )

"""`raypipe status`: what is done, missing or stray for a prompt set, without Ray or a model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from raypipe.errors import InputError, OptionError
from raypipe.options import (
    InferOptions,
    ModelOptions,
    OutputOptions,
    ProjectionOptions,
    split_traits,
)
from raypipe.pipeline.plan import InferPlan, plan_infer
from raypipe.store.atomic import TMP_MARK
from raypipe.store.calibration import is_complete, read_calibration
from raypipe.store.parquet import projection_traits
from raypipe.store.paths import ExperimentPaths

MAX_LISTED = 10  # stray files and missing ids named in the text report


def status_options(args, root: Path, cache_dir: Path, prompt_set: str) -> InferOptions:
    """The infer options that matter for deciding the work, from `raypipe status` flags. A
    prompt set written with `--json none` (tables, no response files) is judged by its tables,
    as its runs are."""
    paths = ExperimentPaths(root, args.experiment)
    json_files = "all"
    if paths.config.is_file():  # (a missing one is the plan's error to name)
        from raypipe.store.experiment import load_experiment

        variant = load_experiment(paths).variant(args.model_variant, "application").name
        table = paths.parquet_file(variant, "responses", prompt_set)
        parts = paths.parquet_parts(variant, "responses", prompt_set)
        if not paths.responses_dir(variant, prompt_set).is_dir() and (
            table.is_file() or parts.is_dir()
        ):
            json_files = "none"
    return InferOptions(
        output=OutputOptions(
            root=root, experiment=args.experiment, prompt_set=prompt_set, json_files=json_files
        ),
        model=ModelOptions(cache_dir=cache_dir, variant=args.model_variant),
        projection=ProjectionOptions(
            component=args.component,
            layers=args.layers,
            traits=split_traits(args.traits),
            method=args.method,
            # Entries count under the settings infer would write them with; `status` has no
            # flag for these yet, so they take infer's defaults unless the parser grows one.
            centered=getattr(args, "centered", False),
            remove_massive_dims=getattr(args, "remove_massive_dims", False),
        ),
    )


def plan_for_status(opts: InferOptions) -> tuple[InferPlan, str | None]:
    """plan_infer with vectors; an experiment with no extracted traits still reports responses."""
    try:
        return plan_infer(opts, need_vectors=True), None
    except InputError as e:
        if opts.projection.traits is not None or e.field != "traits":
            raise
        return plan_infer(opts, need_vectors=False), e.message


def _json_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.glob("*.json") if not p.name.startswith(".")]


def _newest(files: list[Path]) -> int | None:
    times = [f.stat().st_mtime_ns for f in files]
    return max(times) if times else None


def _stray(folder: Path, prefix: str = ".") -> list[Path]:
    """Temp files a killed writer left in `folder` (atomic.py names them `.{name}.tmp-XXXX`)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if TMP_MARK in p.name and p.name.startswith(prefix))


def _parquet_state(path: Path, newest_json: int | None, parts: Path) -> str:
    if parts.is_dir() and any(parts.iterdir()):
        # Rows a run wrote that no compaction has folded in yet: a run is on, or was killed
        # (the next one folds them in).
        return "parts not folded in yet"
    if not path.is_file():
        return "missing" if newest_json is not None else "none (no JSON yet)"
    if newest_json is not None and path.stat().st_mtime_ns < newest_json:
        return "stale"
    return "up to date"


def _calibration_state(path: Path) -> dict:
    """complete / partial (a run was stopped; the next infer goes on with it) / none."""
    try:
        record = read_calibration(path)
    except InputError as e:
        return {"state": "unreadable", "error": str(e)}
    if record is None:
        return {"state": "none"}
    agg = record.get("aggregate")
    return {
        "state": "complete" if is_complete(record) else "partial",
        "tokens_seen": record.get("tokens_seen"),
        "n_prompts": agg.get("n_prompts") if isinstance(agg, dict) else None,
    }


def collect_status(plan: InferPlan, note: str | None = None) -> dict:
    """Counts for one prompt set: what the next `infer` with these flags would skip or do."""
    paths: ExperimentPaths = plan.paths
    variant, name = plan.variant, plan.prompts.name
    ids = plan.prompts.ids
    responses_dir = paths.responses_dir(variant, name)
    # The plan's rule: a row to generate is a response missing (files, or the tables).
    missing_responses = [i for i in ids if i in plan.generate]

    traits = {}
    for trait, missing in plan.missing.items():
        # Per requested (method, layer) entry, not per file: a file without layer 3 is missing
        # for --layers 3 (ProjectionContents says what a file holds).
        missing = list(missing)
        traits[trait] = {
            "present": len(ids) - len(missing),
            "missing": len(missing),
            "missing_ids": missing,
        }

    raw_root = paths.inference_dir(variant) / "raw"
    components = []
    if raw_root.is_dir():
        components = sorted(p.name for p in raw_root.iterdir() if p.is_dir())
    # Per folder under raw/ (raw/residual holds every component a capture took).
    raw = {c: sum((raw_root / c / name / f"{i}.pt").is_file() for i in ids) for c in components}

    # Every folder this prompt set writes into; a temp file there is a write that never finished.
    proj_dirs = [
        paths.projections_root(variant) / t / name for t in projection_traits(paths, variant, name)
    ]
    folders = [responses_dir, paths.calibration_file(variant).parent, *proj_dirs]
    folders += [raw_root / c / name for c in components]
    stray = [p for f in folders for p in _stray(f)]
    parquet = {}
    newest = {
        "responses": _newest(_json_files(responses_dir)),
        "projections": _newest([f for d in proj_dirs for f in _json_files(d)]),
    }
    for table, newest_json in newest.items():
        target = paths.parquet_file(variant, table, name)
        stray += _stray(target.parent, f".{target.name}{TMP_MARK}")
        parts = paths.parquet_parts(variant, table, name)
        stray += _stray(parts)
        state = _parquet_state(target, newest_json, parts)
        parquet[table] = {"path": str(target), "state": state}

    root = paths.inference_dir(variant)
    return {
        "experiment": paths.experiment,
        "variant": variant,
        "prompt_set": name,
        "prompts": len(ids),
        "responses": {
            "present": len(ids) - len(missing_responses),
            "missing": len(missing_responses),
            "missing_ids": missing_responses,
        },
        "projections": traits,
        "projections_note": note,
        "notes": list(plan.notes),
        "raw": raw,
        "stray_temp_files": [str(p.relative_to(root)) for p in stray],
        "parquet": parquet,
        "calibration": _calibration_state(paths.calibration_file(variant)),
    }


def _ids(ids: list[str]) -> str:
    shown = ", ".join(ids[:MAX_LISTED])
    return f" [{shown}{', ...' if len(ids) > MAX_LISTED else ''}]" if ids else ""


def print_status(st: dict, out=None) -> None:
    out = out or sys.stdout
    p = lambda *a: print(*a, file=out)  # noqa: E731
    r = st["responses"]
    p(f"raypipe status: {st['experiment']} / {st['variant']} / {st['prompt_set']}")
    p(f"  prompts: {st['prompts']}")
    p(f"  responses: {r['present']} present, {r['missing']} missing{_ids(r['missing_ids'])}")
    for n in st["notes"]:
        p(f"  note: {n}")
    if st["projections_note"]:
        p(f"  projections: not counted ({st['projections_note']})")
    for trait, t in st["projections"].items():
        p(
            f"  projections {trait}: {t['present']} present, {t['missing']} missing"
            f"{_ids(t['missing_ids'])}"
        )
    cal = st["calibration"]
    if cal["state"] in ("complete", "partial"):
        line = f"{cal['state']}, {cal['tokens_seen']} tokens from {cal['n_prompts']} prompts"
        if cal["state"] == "partial":
            line += " (a run was stopped; the next `raypipe infer` goes on with it)"
    elif cal["state"] == "none":
        line = "none yet (the next `raypipe infer` collects it)"
    else:
        line = f"unreadable ({cal['error']}; the next `raypipe infer` collects it again)"
    p(f"  calibration: {line}")
    for comp, n in st["raw"].items():
        p(f"  raw captures ({comp}): {n} present")
    if not st["raw"]:
        p("  raw captures: none")
    stray = st["stray_temp_files"]
    p(f"  stray temp files: {len(stray)}")
    for s in stray[:MAX_LISTED]:
        p(f"    {s}")
    if len(stray) > MAX_LISTED:
        p(f"    ... and {len(stray) - MAX_LISTED} more")
    for table, info in st["parquet"].items():
        hint = " (older than the newest JSON; re-run `raypipe infer` to rebuild)"
        state = info["state"] + (hint if info["state"] == "stale" else "")
        p(f"  parquet {table}: {state}")


def main_status(args, root: Path, cache_dir: Path, out=None) -> int:
    """Entry from the CLI: one report per prompt set in the comma list `--prompt-set`."""
    out = out or sys.stdout
    sets = [s.strip() for s in args.prompt_set.split(",") if s.strip()]
    if not sets:
        raise OptionError("prompt_set", "names no prompt set")
    reports = []
    for prompt_set in sets:
        plan, note = plan_for_status(status_options(args, root, cache_dir, prompt_set))
        reports.append(collect_status(plan, note))
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else reports[0], indent=2), file=out)
        return 0
    for i, st in enumerate(reports):
        if i:
            print("", file=out)
        print_status(st, out)
    return 0

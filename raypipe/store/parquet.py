"""Parquet tables (projections, responses) per prompt set, rebuilt from the per-prompt JSON."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from raypipe.errors import InputError
from raypipe.store.atomic import write_with
from raypipe.store.outputs import read_projection, read_response
from raypipe.store.paths import ExperimentPaths

_F32 = pa.list_(pa.float32())
PROJECTIONS_SCHEMA = pa.schema(
    [
        ("prompt_set", pa.string()),
        ("prompt_id", pa.string()),
        ("trait", pa.string()),
        ("method", pa.string()),
        ("layer", pa.int32()),
        ("component", pa.string()),
        ("position", pa.string()),
        ("selection_source", pa.string()),
        ("baseline", pa.float64()),
        ("centered", pa.bool_()),
        ("n_prompt_tokens", pa.int32()),
        ("n_response_tokens", pa.int32()),
        ("prompt_scores", _F32),
        ("response_scores", _F32),
        ("prompt_norms", _F32),
        ("response_norms", _F32),
        ("normalized_prompt", _F32),
        ("normalized_response", _F32),
    ]
)
RESPONSES_SCHEMA = pa.schema(
    [
        ("prompt_set", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("system_prompt", pa.string()),
        ("token_ids", pa.list_(pa.int64())),
        ("tokens", pa.list_(pa.string())),
        ("prompt_end", pa.int32()),
        ("model", pa.string()),
        ("capture_date", pa.string()),
    ]
)
ROWS_PER_GROUP = 2048


def _id_sort_key(path: Path):
    stem = path.stem
    # isascii: "²".isdigit() is True, but int("²") raises.
    return (0, int(stem), "") if stem.isascii() and stem.isdigit() else (1, 0, stem)


def _json_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        (p for p in folder.glob("*.json") if not p.name.startswith(".")), key=_id_sort_key
    )


def projection_traits(paths: ExperimentPaths, variant: str, prompt_set: str) -> list[str]:
    root = paths.projections_root(variant)
    if not root.is_dir():
        return []
    return sorted(
        f"{c.name}/{n.name}"
        for c in root.iterdir()
        if c.is_dir()
        for n in c.iterdir()
        if (n / prompt_set).is_dir()
    )


def _readable(read, f: Path, unreadable: list[str] | None):
    """`read(f)`, or None for a broken file when the caller collects them in `unreadable`."""
    try:
        return read(f)
    except InputError as e:
        if unreadable is None:
            raise
        unreadable.append(str(e))
        return None


def _projection_rows(paths, variant, prompt_set, unreadable=None) -> Iterator[dict]:
    for trait in projection_traits(paths, variant, prompt_set):
        folder = paths.projections_root(variant) / trait / prompt_set
        for f in _json_files(folder):
            rec = _readable(read_projection, f, unreadable)
            if rec is None:
                continue
            meta = rec["metadata"]
            for e in rec["projections"]:
                yield {
                    "prompt_set": prompt_set,
                    "prompt_id": f.stem,
                    "trait": trait,
                    "method": e["method"],
                    "layer": e["layer"],
                    "component": meta["component"],
                    "position": meta["position"],
                    "selection_source": e["selection_source"],
                    "baseline": e["baseline"],
                    "centered": meta["centered"],
                    "n_prompt_tokens": meta["n_prompt_tokens"],
                    "n_response_tokens": meta["n_response_tokens"],
                    "prompt_scores": e["prompt"],
                    "response_scores": e["response"],
                    "prompt_norms": e["token_norms"]["prompt"],
                    "response_norms": e["token_norms"]["response"],
                    "normalized_prompt": e["normalized_prompt"],
                    "normalized_response": e["normalized_response"],
                }


def _response_rows(paths, variant, prompt_set, unreadable=None) -> Iterator[dict]:
    for f in _json_files(paths.responses_dir(variant, prompt_set)):
        r = _readable(read_response, f, unreadable)
        if r is None:
            continue
        yield {
            "prompt_set": prompt_set,
            "prompt_id": f.stem,
            "prompt": r["prompt"],
            "response": r["response"],
            "system_prompt": r.get("system_prompt"),
            "token_ids": r["token_ids"],
            "tokens": r["tokens"],
            "prompt_end": r["prompt_end"],
            "model": r.get("inference_model"),
            "capture_date": r.get("capture_date"),
        }


def _write_table(target: Path, schema: pa.Schema, rows: Iterator[dict]) -> int:
    """Stream rows into row groups (memory stays flat), then rename into place."""
    count = 0

    def fill(tmp: str) -> None:
        nonlocal count
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            buf: list[dict] = []
            for row in rows:
                buf.append(row)
                if len(buf) >= ROWS_PER_GROUP:
                    writer.write_table(pa.Table.from_pylist(buf, schema=schema))
                    count += len(buf)
                    buf = []
            if buf or count == 0:
                writer.write_table(pa.Table.from_pylist(buf, schema=schema))
                count += len(buf)

    write_with(target, fill)
    return count


def build_parquet(
    paths: ExperimentPaths, variant: str, prompt_set: str, unreadable: list[str] | None = None
) -> dict[str, tuple[Path, int]]:
    """Rebuild both tables from the JSON files: re-runs can never duplicate rows. With a list
    `unreadable`, a broken file is left out and named there instead of failing the build."""
    out = {}
    for table, schema, rows in (
        (
            "projections",
            PROJECTIONS_SCHEMA,
            _projection_rows(paths, variant, prompt_set, unreadable),
        ),
        ("responses", RESPONSES_SCHEMA, _response_rows(paths, variant, prompt_set, unreadable)),
    ):
        target = paths.parquet_file(variant, table, prompt_set)
        out[table] = (target, _write_table(target, schema, rows))
    return out

"""`--from-activations`: project saved raw captures onto trait vectors, no model, as Ray tasks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raypipe.engine.projector import layer_scores
from raypipe.errors import InputError, RaypipeError
from raypipe.store.captures import read_capture
from raypipe.store.outputs import (
    VectorInfo,
    merged_projection,
    projection_contents,
    projection_entry,
    projection_record,
    requested_entries,
    write_projection,
)
from raypipe.store.parquet import projection_rows, write_part
from raypipe.store.paths import ExperimentPaths
from raypipe.store.vectors import load_vectors

CHUNK_FILES = 32  # files per Ray task: enough work to amortise a task, small enough to spread


@dataclass(frozen=True)
class _Vector:
    """What projection needs of a VectorSpec, as a plain picklable value."""

    info: VectorInfo
    vector: list[float] = field(repr=False)


def _plain(v: Any) -> _Vector:
    info = VectorInfo(
        v.trait, v.method, v.position, int(v.layer), v.selection_source, float(v.baseline)
    )
    [(_, vec)] = load_vectors([v], None)  # the plan checked its size against the model
    return _Vector(info, vec)


def _layer_acts(record: dict, layer: int, component: str, source: str) -> torch.Tensor:
    """(T, D) over prompt then response, in the captured dtype."""
    parts = []
    for seg in ("prompt", "response"):
        acts = record[seg]["activations"]
        if layer not in acts:
            raise InputError(
                source,
                f"{seg}.activations",
                f"layer {layer} was not captured (captured layers: {sorted(acts)}); "
                f"capture again with --layers including {layer}",
            )
        if component not in acts[layer]:
            raise InputError(
                source,
                f"{seg}.activations.{layer}",
                f"component {component!r} was not captured at layer {layer} "
                f"(captured: {sorted(acts[layer])})",
            )
        parts.append(acts[layer][component])
    return torch.cat(parts, dim=0)


@dataclass
class _Scores:
    scores: np.ndarray  # (S, T) float32
    norms: np.ndarray  # (S, T)
    cleaned_scores: np.ndarray | None = None  # (S, T)
    cleaned_norms: np.ndarray | None = None  # (S, T)


@torch.inference_mode()
def _score(
    record: dict,
    vectors: list[_Vector],
    component: str,
    massive_dims: Sequence[int] | None,
    source: str,
) -> _Scores:
    """The Projector's math, step for step in fp32, so stream-through and re-projection agree."""
    n = len(record["prompt"]["token_ids"]) + len(record["response"]["token_ids"])
    s = len(vectors)
    scores = np.zeros((s, n), dtype=np.float32)
    norms = np.zeros((s, n), dtype=np.float32)
    dims = torch.tensor(sorted(set(massive_dims)), dtype=torch.long) if massive_dims else None
    cleaned = (np.zeros_like(scores), np.zeros_like(norms)) if dims is not None else None
    for layer in sorted({v.info.layer for v in vectors}):
        rows = [i for i, v in enumerate(vectors) if v.info.layer == layer]
        hf = _layer_acts(record, layer, component, source).float()  # (T, D)
        mat = torch.stack([torch.as_tensor(vectors[i].vector, dtype=torch.float32) for i in rows])
        if mat.shape[1] != hf.shape[1]:
            raise InputError(
                source,
                f"activations.{layer}.{component}",
                f"hidden size {hf.shape[1]} but the vectors have {mat.shape[1]}",
            )
        if dims is not None and int(dims.max()) >= hf.shape[1]:
            raise ValueError(f"massive dim {int(dims.max())} >= hidden size {hf.shape[1]}")
        vec = (mat / mat.norm(dim=1, keepdim=True)).T.contiguous()  # (D, K) unit columns
        parts = layer_scores(hf, vec, dims)  # (T, K), (T,)[, (T, K), (T,)]
        scores[rows] = parts[0].T.numpy()
        norms[rows] = parts[1].clamp_min(0).sqrt().numpy()
        if dims is not None:
            cleaned[0][rows] = parts[2].T.numpy()
            cleaned[1][rows] = parts[3].clamp_min(0).sqrt().numpy()
    out = _Scores(scores, norms)
    if cleaned is not None:
        out.cleaned_scores, out.cleaned_norms = cleaned
    return out


def project_capture(
    record: dict,
    vectors: Sequence[Any],
    component: str,
    centered: bool,
    massive_dims: Sequence[int] | None = None,
    *,
    prompt_id: str,
    prompt_set: str,
    source: str | Path = "capture",
) -> dict[str, dict]:
    """{trait: projection record} for one capture (as read_capture returns it); `source` is the
    file named in errors. The records are the same as stream-through writes for these vectors."""
    if not vectors:
        raise ValueError("project_capture needs at least one vector")
    plain = [v if isinstance(v, _Vector) else _plain(v) for v in vectors]
    res = _score(record, plain, component, massive_dims, str(source))
    end = len(record["prompt"]["token_ids"])
    n_resp = len(record["response"]["token_ids"])
    by_trait: dict[str, list[int]] = {}
    for i, v in enumerate(plain):
        by_trait.setdefault(v.info.trait, []).append(i)
    out = {}
    for trait, idx in by_trait.items():
        entries = [
            projection_entry(
                plain[i].info,
                res.scores[i],
                res.norms[i],
                end,
                centered,
                (res.cleaned_scores[i], res.cleaned_norms[i], list(massive_dims))
                if res.cleaned_scores is not None
                else None,
            )
            for i in idx
        ]
        out[trait] = projection_record(
            prompt_id=str(prompt_id),
            prompt_set=prompt_set,
            n_prompt_tokens=end,
            n_response_tokens=n_resp,
            component=component,
            position=plain[idx[0]].info.position,
            centered=centered,
            entries=entries,
        )
    return out


@dataclass
class FromActivationsResult:
    """Counts per prompt: done (some file written), skipped (all existed), failed (why)."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    tokens: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)


def _project_files(
    paths: ExperimentPaths,
    variant: str,
    prompt_set: str,
    prompt_ids: list[str],
    vectors: list[_Vector],
    component: str,
    centered: bool,
    force: bool,
    massive_dims: Sequence[int] | None,
) -> list[tuple[str, str, str | None, int]]:
    """(prompt_id, status, reason, n_tokens) per prompt; one bad file never sinks the others.
    A trait's file is to do when it lacks a requested (method, layer) entry, as in the plan."""
    requested = requested_entries([v.info for v in vectors], component, centered)
    out, files, table = [], [], []
    for pid in prompt_ids:
        todo = {}
        for trait, (settings, wanted) in requested.items():
            path = paths.projection_file(variant, trait, prompt_set, pid)
            held = None if force else projection_contents(path)
            if held is None or held.missing(settings, wanted, massive_dims):
                todo[trait] = path
        if not todo:
            out.append((pid, "skipped", None, 0))
            continue
        src = paths.raw_file(variant, component, prompt_set, pid)
        if not src.is_file():
            out.append((pid, "failed", f"{src}: no raw capture (run with --capture first)", 0))
            continue
        try:
            rec = read_capture(src)
            # Every vector, even for traits already written: the same matmul shapes as the
            # projector; update_projection keeps what a file holds already.
            records = project_capture(
                rec,
                vectors,
                component,
                centered,
                massive_dims,
                prompt_id=pid,
                prompt_set=prompt_set,
                source=src,
            )
            for trait, path in todo.items():
                merged = merged_projection(path, records[trait], force=force)
                if merged is not None:
                    files.append((path, merged))
                    table += projection_rows(merged, trait, pid, prompt_set)
        except RaypipeError as e:
            out.append((pid, "failed", str(e), 0))
            continue
        except Exception as e:  # e.g. NaN in a capture: report it against this file only
            out.append((pid, "failed", f"{src}: {type(e).__name__}: {e}", 0))
            continue
        n = len(rec["prompt"]["token_ids"]) + len(rec["response"]["token_ids"])
        out.append((pid, "done", None, n))
    # As the stream-through writer does: the table's part first, then the files.
    write_part(paths, variant, "projections", prompt_set, table, [True] * len(table))
    for path, merged in files:
        write_projection(path, merged)
    return out


def run_from_activations(
    paths: ExperimentPaths,
    variant: str,
    prompt_set: str,
    prompt_ids: Sequence[str],
    vectors: Sequence[Any],
    component: str,
    centered: bool,
    force: bool,
    massive_dims: Sequence[int] | None = None,
    chunk_files: int = CHUNK_FILES,
) -> FromActivationsResult:
    """Project `raw/{component}/{prompt_set}/{id}.pt` for each id as Ray tasks; no model loads.

    Existing projection files are kept unless `force`. Uses the running Ray (or starts one)."""
    import ray

    if not vectors:
        raise ValueError("run_from_activations needs at least one vector")
    ids = [str(p) for p in prompt_ids]
    # Idempotent (atomic writes of the same content), so a retry after a lost worker is safe.
    task = ray.remote(num_cpus=1, max_retries=3)(_project_files)
    vec_ref = ray.put([_plain(v) for v in vectors])  # shipped once, not once per task
    dims = list(massive_dims) if massive_dims else None
    refs = [
        task.remote(
            paths,
            variant,
            prompt_set,
            ids[i : i + chunk_files],
            vec_ref,
            component,
            centered,
            force,
            dims,
        )
        for i in range(0, len(ids), max(1, chunk_files))
    ]
    result = FromActivationsResult()
    for rows in ray.get(refs):
        for pid, status, reason, n in rows:
            if status == "done":
                result.done += 1
                result.tokens += n
            elif status == "skipped":
                result.skipped += 1
            else:
                result.failed += 1
                result.failures.append((pid, reason or "unknown error"))
    return result

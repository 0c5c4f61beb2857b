"""`--from-activations`: score saved raw captures onto trait vectors with the projector's math,
no model: a stage of the same pipeline as stream-through (backend "saved")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raypipe.engine.projector import SequenceScores, layer_scores
from raypipe.errors import InputError, RaypipeError
from raypipe.store.captures import find_capture, read_capture
from raypipe.store.outputs import (
    VectorInfo,
)
from raypipe.store.vectors import load_vectors


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
    for seg in _segments(record):
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


def _segments(record: dict) -> tuple[str, ...]:
    """The segments scored: a response-only capture has no prompt activations."""
    return ("response",) if record.get("response_only") else ("prompt", "response")


def _ids(record: dict) -> list[int]:
    """The token ids the scores cover, prompt then response."""
    return [i for seg in _segments(record) for i in record[seg]["token_ids"]]


@torch.inference_mode()
def _score(
    record: dict,
    vectors: list[_Vector],
    component: str,
    massive_dims: Sequence[int] | None,
    source: str,
) -> SequenceScores:
    """The Projector's math, step for step in fp32, so stream-through and re-projection agree."""
    n = len(_ids(record))
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
    out = SequenceScores(scores, norms)
    if cleaned is not None:
        out.cleaned_scores, out.cleaned_norms = cleaned
    return out


def score_capture(
    record: dict,
    vectors: Sequence[Any],
    component: str,
    massive_dims: Sequence[int] | None = None,
    source: str | Path = "capture",
) -> SequenceScores:
    """Scores and norms (S, T) of one capture (as read_capture returns it), prompt then
    response tokens: what the hooked projector gives for the same hidden states. `source` is
    the file named in errors."""
    plain = [v if isinstance(v, _Vector) else _plain(v) for v in vectors]
    return _score(record, plain, component, massive_dims, str(source))


class SavedActivationsStage:
    """--from-activations as a stage of the one pipeline: each row's raw capture, scored with
    the projector's math, as the columns the projection writer takes. No model loads; one bad
    capture fails its row alone."""

    NEEDS = ("prompt_set", "prompt_id", "project")
    PRODUCES = (
        "prompt_set",
        "prompt_id",
        "prompt_end",
        "token_ids",
        "generated",
        "error",
        "scores",
        "norms",
        "cleaned_scores",
        "cleaned_norms",
    )

    def __init__(self, paths, variant, component, vectors, massive_dims, progress=None):
        self.paths, self.variant, self.component = paths, variant, component
        self.progress = progress  # a live.Reporter: rows scored, per batch
        self.vectors = [_plain(v) for v in vectors]  # loaded here, from the checked files
        self.dims = list(massive_dims) if massive_dims else None

    def __call__(self, batch):
        from raypipe.pipeline.live import report
        from raypipe.pipeline.stages import _frame, _rows, require

        require(batch, "from_activations", self.NEEDS)
        out = []
        live, scored = report(self.progress, batch), 0
        for row in _rows(batch):
            res = {
                "prompt_set": row["prompt_set"],
                "prompt_id": row["prompt_id"],
                "generated": False,
                "error": None,
            }
            if row["project"]:
                res.update(self._score(row))
                scored += 1
                live.set(projected=scored)
            out.append(res)
        live.set(flush=True, projected=scored)
        return _frame(out, self.PRODUCES)

    def _score(self, row: dict) -> dict:
        from raypipe.pipeline.stages import put_scores

        src = find_capture(
            self.paths, self.variant, self.component, row["prompt_set"], row["prompt_id"]
        )
        if not src.is_file():
            return {"error": f"{src}: no raw capture (run with --capture first)"}
        try:
            rec = read_capture(src)
            res = _score(rec, self.vectors, self.component, self.dims, str(src))
        except RaypipeError as e:
            return {"error": str(e)}
        except Exception as e:  # e.g. NaN in a capture: against this file only
            return {"error": f"{src}: {type(e).__name__}: {e}"}
        ids = _ids(rec)
        end = 0 if rec["response_only"] else len(rec["prompt"]["token_ids"])
        out = {"prompt_end": end, "token_ids": ids}
        put_scores([out], [res])  # the same columns as the hooked projector's
        return out

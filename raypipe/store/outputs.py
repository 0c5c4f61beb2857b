"""Response JSON and projection JSON (SPEC section 7): built, written and read only here."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from raypipe.errors import InputError
from raypipe.store.atomic import read_json, write_json
from raypipe.store.scores import center, normalize_projections
from raypipe.store.text import brief, check_text

RESPONSE_KEYS = (
    "prompt",
    "response",
    "system_prompt",
    "tokens",
    "token_ids",
    "prompt_end",
    "inference_model",
    "prompt_note",
    "capture_date",
    "tags",
)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def response_record(
    *,
    prompt: str,
    response: str,
    system_prompt: str | None,
    tokens: list[str],
    token_ids: list[int],
    prompt_end: int,
    model: str,
    note: str | None,
) -> dict:
    return {
        "prompt": prompt,
        "response": response,
        "system_prompt": system_prompt,
        "tokens": list(tokens),
        "token_ids": [int(t) for t in token_ids],
        "prompt_end": int(prompt_end),
        "inference_model": model,
        "prompt_note": note,
        "capture_date": now_iso(),
        "tags": [],
    }


def write_response(path: Path, record: dict) -> Path:
    return write_json(path, record)


def read_response(path: Path) -> dict:
    """A response file, checked enough that a prefill over its token ids is meaningful."""
    rec = read_json(path, "response")
    if not isinstance(rec, dict):
        raise InputError(path, "response", "must be a JSON object")
    ids = rec.get("token_ids")
    if (
        not isinstance(ids, list)
        or not ids
        or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
    ):
        raise InputError(path, "token_ids", "must be a non-empty list of token ids")
    end = rec.get("prompt_end")
    if isinstance(end, bool) or not isinstance(end, int) or not 0 < end <= len(ids):
        raise InputError(
            path, "prompt_end", f"must be an integer in 1..{len(ids)}, got {brief(end)}"
        )
    tokens = rec.get("tokens")
    if not isinstance(tokens, list) or len(tokens) != len(ids):
        raise InputError(path, "tokens", "must list one string per token id")
    for i, token in enumerate(tokens):
        if not isinstance(token, str):
            raise InputError(path, f"tokens[{i}]", f"must be a string, got {brief(token)}")
        check_text(token, path, f"tokens[{i}]")
    # A reused response goes on to Parquet, which needs strings it can encode as UTF-8.
    for key in ("prompt", "response", "system_prompt", "inference_model", "capture_date"):
        value = rec.get(key)
        if value is None and key not in ("prompt", "response"):
            continue
        if not isinstance(value, str):
            raise InputError(path, key, "must be a string")
        check_text(value, path, key)
    return rec


@dataclass(frozen=True)
class VectorInfo:
    """What the projection file records about one vector (no tensor)."""

    trait: str
    method: str
    position: str
    layer: int
    selection_source: str
    baseline: float


def _floats(a: np.ndarray) -> list[float]:
    # float32 -> Python float is exact, so the JSON round trip is lossless.
    return np.asarray(a, dtype=np.float32).tolist()


def projection_entry(
    info: VectorInfo,
    scores: np.ndarray,  # (T,) float32
    norms: np.ndarray,  # (T,)
    prompt_end: int,
    centered: bool,
    cleaned: tuple[np.ndarray, np.ndarray, list[int]] | None = None,
) -> dict:
    s = center(scores, info.baseline) if centered else scores
    p, r = s[:prompt_end], s[prompt_end:]
    pn, rn = norms[:prompt_end], norms[prompt_end:]
    entry = {
        "method": info.method,
        "layer": info.layer,
        "selection_source": info.selection_source,
        "baseline": info.baseline,
        "prompt": _floats(p),
        "response": _floats(r),
        "token_norms": {"prompt": _floats(pn), "response": _floats(rn)},
        # SPEC 6 by its one definition; 0.0 where undefined, as trait-interp writes it.
        "normalized_prompt": _floats(normalize_projections(p, pn, "normalized", 0.0)),
        "normalized_response": _floats(normalize_projections(r, rn, "normalized", 0.0)),
    }
    if cleaned is not None:
        cs, cn, dims = cleaned
        cs = center(cs, info.baseline) if centered else cs
        entry["cleaned"] = {
            "dims": [int(d) for d in dims],
            "prompt": _floats(cs[:prompt_end]),
            "response": _floats(cs[prompt_end:]),
            "token_norms": {
                "prompt": _floats(cn[:prompt_end]),
                "response": _floats(cn[prompt_end:]),
            },
        }
    return entry


def projection_record(
    *,
    prompt_id: str,
    prompt_set: str,
    n_prompt_tokens: int,
    n_response_tokens: int,
    component: str,
    position: str,
    centered: bool,
    entries: list[dict],
) -> dict:
    return {
        "metadata": {
            "prompt_id": prompt_id,
            "prompt_set": prompt_set,
            "n_prompt_tokens": int(n_prompt_tokens),
            "n_response_tokens": int(n_response_tokens),
            # trait-interp's viewer reads the list-of-vectors shape only with these (SPEC 7).
            "multi_vector": True,
            "n_vectors": len(entries),
            "component": component,
            "position": position,
            "centered": bool(centered),
            "score_mode": "raw+normalized",
            "projection_date": now_iso(),
        },
        "projections": entries,
        "activation_norms": activation_norms(entries),
    }


def _mean(values) -> float:
    # An empty segment (a response-only capture's prompt) has 0.0, as trait-interp writes it.
    return float(np.mean(np.asarray(values, dtype=np.float64))) if len(values) else 0.0


def activation_norms(entries: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Top-level `activation_norms` (SPEC 7): per segment, layer -> mean |h| over its tokens,
    from the entries' token norms (one component per file, so entries of a layer agree)."""
    out: dict[str, dict[str, float]] = {"prompt": {}, "response": {}}
    for e in sorted(entries, key=lambda e: e["layer"]):
        norms = e.get("token_norms")
        if not isinstance(norms, dict):
            continue
        for seg in out:
            values = norms.get(seg)
            if isinstance(values, list) and all(isinstance(v, int | float) for v in values):
                out[seg].setdefault(str(e["layer"]), _mean(values))
    return out


def write_projection(path: Path, record: dict) -> Path:
    return write_json(path, record)


def read_projection(path: Path) -> dict:
    rec = read_json(path, "projection")
    if not isinstance(rec, dict) or not isinstance(rec.get("metadata"), dict):
        raise InputError(path, "metadata", "missing")
    if not isinstance(rec.get("projections"), list):
        raise InputError(path, "projections", "must be a list")
    return rec


@dataclass(frozen=True)
class ProjectionSettings:
    """What a projection file's metadata says of every entry in it: one file, one setting."""

    component: str
    centered: bool
    position: str

    @classmethod
    def of(cls, meta: dict) -> ProjectionSettings | None:
        """None when the metadata does not say (a foreign or damaged file)."""
        comp, centered, pos = meta.get("component"), meta.get("centered"), meta.get("position")
        if not (isinstance(comp, str) and isinstance(centered, bool) and isinstance(pos, str)):
            return None
        return cls(comp, centered, pos)

    def differences(self, other: ProjectionSettings | None) -> str:
        """This setting's fields that `other` does not share, as `name=value, ...`."""
        fields = ("component", "centered", "position")
        return ", ".join(
            f"{f}={getattr(self, f)}"
            for f in fields
            if other is None or getattr(self, f) != getattr(other, f)
        )


def requested_entries(
    vectors: Iterable, component: str, centered: bool
) -> dict[str, tuple[ProjectionSettings, tuple[tuple[str, int], ...]]]:
    """trait -> (the settings its file is written with, the (method, layer) entries a run asks
    for), from vectors with trait, method, position and layer (VectorSpec, VectorInfo)."""
    out: dict[str, tuple[ProjectionSettings, tuple[tuple[str, int], ...]]] = {}
    for v in vectors:
        # One vector set per trait (resolve_vectors), so one position per trait.
        settings = ProjectionSettings(component, centered, v.position)
        _, wanted = out.get(v.trait, (settings, ()))
        out[v.trait] = (settings, (*wanted, (v.method, int(v.layer))))
    return out


def _entry_key(entry) -> tuple[str, int] | None:
    if not isinstance(entry, dict):
        return None
    method, layer = entry.get("method"), entry.get("layer")
    if not isinstance(method, str) or isinstance(layer, bool) or not isinstance(layer, int):
        return None
    return method, layer


def _cleaned_dims(entry: dict) -> tuple[int, ...] | None:
    cleaned = entry.get("cleaned")
    dims = cleaned.get("dims") if isinstance(cleaned, dict) else None
    return tuple(sorted(dims)) if isinstance(dims, list) else None


@dataclass(frozen=True)
class ProjectionContents:
    """Which (method, layer) entries a projection file holds, and under which settings.

    The one rule for "done", used by the plan, `raypipe status`, the projection writer and
    --from-activations: a requested (method, layer) is held when the file carries an entry for
    it under the run's settings (component, centered, position) and, when the run removes
    massive dims, with scores cleaned of exactly those dims.
    """

    settings: ProjectionSettings | None
    entries: tuple[tuple[str, int, tuple[int, ...] | None], ...]  # (method, layer, dims)

    @classmethod
    def of(cls, record: dict) -> ProjectionContents:
        held = []
        for e in record["projections"]:
            key = _entry_key(e)
            if key is not None:
                held.append((*key, _cleaned_dims(e)))
        return cls(ProjectionSettings.of(record["metadata"]), tuple(held))

    def holds(
        self,
        settings: ProjectionSettings,
        method: str,
        layer: int,
        dims: Sequence[int] | None = None,
    ) -> bool:
        if self.settings != settings:
            return False
        want = tuple(sorted(dims)) if dims else None
        return any(
            (m, lay) == (method, layer) and (want is None or d == want)
            for m, lay, d in self.entries
        )

    def missing(
        self,
        settings: ProjectionSettings,
        wanted: Iterable[tuple[str, int]],
        dims: Sequence[int] | None = None,
    ) -> list[tuple[str, int]]:
        return [(m, lay) for m, lay in wanted if not self.holds(settings, m, lay, dims)]


def projection_contents(path: Path) -> ProjectionContents | None:
    """What the file at `path` holds; None when there is none or it cannot be read (either way
    its entries are to be written)."""
    try:
        # The scores are not needed here: skipping their conversion reads a file 3x faster,
        # and the plan and `raypipe status` read every file of the prompt set.
        rec = json.loads(Path(path).read_bytes(), parse_float=lambda _: None)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("metadata"), dict):
        return None
    if not isinstance(rec.get("projections"), list):
        return None
    return ProjectionContents.of(rec)


def _entry_order(entry: dict) -> tuple[int, str]:
    method, layer = _entry_key(entry)
    return layer, method


def update_projection(
    path: Path, record: dict, force: bool = False, fresh: bool = False
) -> dict | None:
    """Write `record` into the file at `path` as merged_projection merges it; returns the
    file's record as written, None when nothing was written."""
    merged = merged_projection(path, record, force, fresh)
    if merged is not None:
        write_projection(path, merged)
    return merged


def merged_projection(
    path: Path, record: dict, force: bool = False, fresh: bool = False
) -> dict | None:
    """What the file at `path` is to hold once `record` (one run's entries for one prompt and
    trait) goes in; None when nothing changes.

    The file's other entries stay: the run's entries the file does not hold yet (all of them
    with `force`) are merged in by (method, layer), the run's winning, sorted by layer then
    method. The run's record replaces the file instead when the response was regenerated
    (`fresh`: old scores belong to another token sequence), when there is no readable file,
    and when the file holds entries under other settings: its metadata states one component,
    centered flag and position for all of them, so they cannot share it (the plan says so in
    its notes, and counts such a file as to do).
    """
    old = None
    if not fresh and path.is_file():
        try:
            old = read_projection(path)
        except InputError:
            old = None  # unreadable: written again
    settings = ProjectionSettings.of(record["metadata"])
    if old is None or ProjectionSettings.of(old["metadata"]) != settings:
        return record
    held = ProjectionContents.of(old)
    new = {
        _entry_key(e): e
        for e in record["projections"]
        if force or not held.holds(settings, *_entry_key(e), _cleaned_dims(e))
    }
    if not new:
        return None
    kept = {k: e for e in old["projections"] if (k := _entry_key(e)) is not None and k not in new}
    merged = sorted([*kept.values(), *new.values()], key=_entry_order)
    meta = {**record["metadata"], "n_vectors": len(merged)}
    # Keys of the file's own beyond metadata and projections (a foreign writer's) stay too.
    return {
        **old,
        **record,
        "metadata": meta,
        "projections": merged,
        "activation_norms": activation_norms(merged),
    }

"""Response JSON and projection JSON (SPEC section 7): built, written and read only here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from raypipe.errors import InputError
from raypipe.store.atomic import read_json, write_json
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


def _mean_norm_divide(scores: np.ndarray, norms: np.ndarray) -> np.ndarray:
    mean = float(norms.mean()) if norms.size else 0.0
    return scores / np.float32(mean) if mean > 0 else np.zeros_like(scores)


def projection_entry(
    info: VectorInfo,
    scores: np.ndarray,  # (T,) float32
    norms: np.ndarray,  # (T,)
    prompt_end: int,
    centered: bool,
    cleaned: tuple[np.ndarray, np.ndarray, list[int]] | None = None,
) -> dict:
    s = scores - np.float32(info.baseline) if centered else scores
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
        "normalized_prompt": _floats(_mean_norm_divide(p, pn)),
        "normalized_response": _floats(_mean_norm_divide(r, rn)),
    }
    if cleaned is not None:
        cs, cn, dims = cleaned
        cs = cs - np.float32(info.baseline) if centered else cs
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
            "component": component,
            "position": position,
            "centered": bool(centered),
            "score_mode": "raw+normalized",
            "projection_date": now_iso(),
        },
        "projections": entries,
    }


def write_projection(path: Path, record: dict) -> Path:
    return write_json(path, record)


def read_projection(path: Path) -> dict:
    rec = read_json(path, "projection")
    if not isinstance(rec, dict) or not isinstance(rec.get("metadata"), dict):
        raise InputError(path, "metadata", "missing")
    if not isinstance(rec.get("projections"), list):
        raise InputError(path, "projections", "must be a list")
    return rec

"""Raw capture `.pt` files (SPEC section 7): built, written and read only here."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from raypipe.errors import InputError
from raypipe.store.atomic import write_tensor
from raypipe.store.text import brief, printable

SEGMENTS = ("prompt", "response")


def _own(t: torch.Tensor) -> torch.Tensor:
    # A slice shares the storage of the whole sequence, and torch.save writes whole storages.
    return t.detach().clone(memory_format=torch.contiguous_format)


def build_capture(
    *,
    prompt_text: str,
    response_text: str,
    tokens: Sequence[str],
    token_ids: Sequence[int],
    prompt_end: int,
    activations: dict[int, torch.Tensor],  # {layer: (T, D)} over prompt + response tokens
    component: str,
) -> dict:
    """The capture record: prompt and response halves, each `{L: {component: (n, D)}}`."""
    n = len(token_ids)
    if len(tokens) != n:
        raise ValueError(f"{len(tokens)} token strings for {n} token ids")
    if not 0 < prompt_end <= n:
        raise ValueError(f"prompt_end {prompt_end} outside 1..{n}")
    for layer, t in activations.items():
        if t.dim() != 2 or t.shape[0] != n:
            raise ValueError(f"layer {layer}: activations {tuple(t.shape)} for {n} tokens")
    ids = [int(i) for i in token_ids]
    toks = [str(t) for t in tokens]
    cut = {"prompt": slice(0, prompt_end), "response": slice(prompt_end, n)}
    text = {"prompt": prompt_text, "response": response_text}
    return {
        seg: {
            "text": text[seg],
            "tokens": toks[cut[seg]],
            "token_ids": ids[cut[seg]],
            "activations": {
                int(layer): {component: _own(t[cut[seg]])}
                for layer, t in sorted(activations.items())
            },
        }
        for seg in SEGMENTS
    }


def capture_components(path: Path) -> set[str]:
    """The components a capture file holds at its first layer (empty when there is no readable
    file); memory-mapped, so the activations are not read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
        acts = obj["response"]["activations"]
        return {c for comps in acts.values() for c in comps if isinstance(c, str)}
    except Exception:  # missing, damaged, foreign: none held
        return set()


def find_capture(paths, variant: str, component: str, prompt_set: str, prompt_id: str) -> Path:
    """The capture to read `component` from: the first of paths.raw_files that holds it, else
    the first that exists (read_capture then names what it lacks), else the place it belongs."""
    files = paths.raw_files(variant, component, prompt_set, prompt_id)
    existing = [f for f in files if f.is_file()]
    for f in existing:
        if component in capture_components(f):
            return f
    return existing[0] if existing else files[0]


def _merged(path: Path, record: dict) -> dict:
    """`record` with the other components an existing capture of the same tokens holds at its
    layers: one file per prompt keeps every component, as trait-interp's does."""
    if not path.is_file():
        return record
    try:
        old = read_capture(path)
    except InputError:
        return record  # unreadable: replaced
    same = all(old[s]["token_ids"] == record[s]["token_ids"] for s in SEGMENTS)
    if not same:
        return record  # another token sequence (a regenerated response): replaced
    out = {}
    for seg in SEGMENTS:
        acts = {layer: dict(comps) for layer, comps in old[seg]["activations"].items()}
        for layer, comps in record[seg]["activations"].items():
            acts.setdefault(layer, {}).update(comps)
        out[seg] = {**record[seg], "activations": dict(sorted(acts.items()))}
    return out


def write_capture(path: Path, record: dict) -> Path:
    return write_tensor(path, _merged(Path(path), record))


def _layer_key(key, path: Path, field: str) -> int:
    # Layers are saved as ints; digit strings are accepted for files written by other tools.
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    if isinstance(key, str) and key.isascii() and key.isdigit():  # int("²") raises
        return int(key)
    raise InputError(path, field, f"layer key {brief(key)} is not a layer number")


def _segment(obj: dict, seg: str, path: Path) -> dict:
    part = obj.get(seg)
    if not isinstance(part, dict):
        raise InputError(path, seg, "missing or not a dict")
    if not isinstance(part.get("text"), str):
        raise InputError(path, f"{seg}.text", "missing or not a string")
    ids = part.get("token_ids")
    if not isinstance(ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids
    ):
        raise InputError(path, f"{seg}.token_ids", "must be a list of token ids")
    tokens = part.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        raise InputError(path, f"{seg}.tokens", "must be a list of strings")
    n = len(ids)
    if len(tokens) != n:
        raise InputError(path, f"{seg}.tokens", f"has {len(tokens)} strings for {n} token ids")
    acts = part.get("activations")
    if not isinstance(acts, dict):
        raise InputError(path, f"{seg}.activations", "missing or not a dict")
    if not acts and seg == "response":
        raise InputError(path, f"{seg}.activations", "is empty")
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, comps in acts.items():
        field = f"{seg}.activations.{printable(key)}"  # a key from the file: one line
        layer = _layer_key(key, path, field)
        if not isinstance(comps, dict) or not comps:
            raise InputError(path, field, "must be a non-empty dict of component -> tensor")
        out[layer] = {}
        for comp, t in comps.items():
            where = f"{field}.{printable(comp)}"
            if not isinstance(comp, str):
                raise InputError(path, where, "component name must be a string")
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
                raise InputError(path, where, "must be a 2-D float tensor [tokens, hidden]")
            if t.shape[0] != n:
                raise InputError(path, where, f"has {t.shape[0]} rows but the {seg} has {n} tokens")
            out[layer][comp] = t
    return {"text": part["text"], "tokens": tokens, "token_ids": ids, "activations": out}


def read_capture(path: Path) -> dict:
    """A capture file, loaded without unpickling code, checked so that projecting it is sound.
    `response_only` is True when the prompt has no activations (or no tokens): then only the
    response is scored."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "capture", "file not found")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:  # truncated, not a torch file, or pickled objects
        # torch's own message spans lines and suggests weights_only=False: never pass that on.
        raise InputError(
            path, "capture", f"not a loadable capture file ({type(e).__name__}): truncated?"
        ) from None
    if not isinstance(obj, dict):
        raise InputError(path, "capture", "must be a dict with 'prompt' and 'response'")
    rec = {seg: _segment(obj, seg, path) for seg in SEGMENTS}
    # A response-only capture (trait-interp's --response-only) has no prompt activations.
    rec["response_only"] = not rec["prompt"]["activations"] or not rec["prompt"]["token_ids"]
    if rec["response_only"]:
        if not rec["response"]["token_ids"]:
            raise InputError(path, "response.token_ids", "a response-only capture has no tokens")
        return rec
    shapes = {
        seg: {
            (layer, comp): t.shape[1]
            for layer, comps in rec[seg]["activations"].items()
            for comp, t in comps.items()
        }
        for seg in SEGMENTS
    }
    if set(shapes["prompt"]) != set(shapes["response"]):
        raise InputError(
            path, "response.activations", "layers or components differ from the prompt's"
        )
    for key, width in shapes["prompt"].items():
        if shapes["response"][key] != width:
            layer, comp = key
            raise InputError(
                path,
                f"response.activations.{layer}.{comp}",
                f"hidden size {shapes['response'][key]} differs from the prompt's {width}",
            )
    return rec

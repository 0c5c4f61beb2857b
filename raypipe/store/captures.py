"""Raw capture `.pt` files (SPEC section 7): built, written and read only here."""

from __future__ import annotations

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


def write_capture(path: Path, record: dict) -> Path:
    return write_tensor(path, record)


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
    if not isinstance(acts, dict) or not acts:
        raise InputError(path, f"{seg}.activations", "missing, empty or not a dict")
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
    """A capture file, loaded without unpickling code, checked so that projecting it is sound."""
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
    if not rec["prompt"]["token_ids"]:
        raise InputError(path, "prompt.token_ids", "the prompt has no tokens")
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

"""Activation statistics from a hooked prefill: per-sequence means over a token position range."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import torch

from raypipe.engine.hooks import hooked_prefill, model_device, pad_right

_POSITION = re.compile(r"^(prompt|response|all)\[(-?\d*)(:?)(-?\d*)\]$")


def position_range(position: str, prompt_end: int, total: int) -> tuple[int, int]:
    """`response[:5]`, `response[:]`, `prompt[-1]`, `all[:]` -> absolute [lo, hi) token range."""
    m = _POSITION.match(position.replace(" ", ""))
    if not m:
        raise ValueError(f"bad position {position!r}; e.g. response[:], response[:5], prompt[-1]")
    seg, a, colon, b = m.groups()
    base, end = {"prompt": (0, prompt_end), "response": (prompt_end, total), "all": (0, total)}[seg]
    n = end - base
    idx = range(n)
    if colon:
        sel = idx[slice(int(a) if a else None, int(b) if b else None)]
    else:
        if not a:
            raise ValueError(f"bad position {position!r}")
        k = int(a)
        sel = idx[k : k + 1] if k >= 0 else idx[n + k : n + k + 1] if n + k >= 0 else range(0)
    if len(sel) == 0:
        return base, base
    return base + sel.start, base + sel.stop


@torch.inference_mode()
def segment_means(
    model,
    seqs: list[list[int]],
    ranges: list[tuple[int, int]],
    layers: list[int],
    component: str = "residual",
    batch_size: int = 16,
    pad_id: int = 0,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(N, L, D) float32: mean of each sequence's hidden states over its [lo, hi) range;
    `progress(sequences done)` after each batch."""
    device = model_device(model)
    out = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start : start + batch_size]
        rng = ranges[start : start + batch_size]
        ids, mask = pad_right(chunk, pad_id, device)
        width = ids.shape[1]
        sel = torch.zeros((len(chunk), width), dtype=torch.float32, device=device)  # (B, T)
        for row, (lo, hi) in enumerate(rng):
            if hi <= lo:
                raise ValueError(f"sequence {start + row} has no tokens at the chosen position")
            sel[row, lo:hi] = 1.0 / (hi - lo)

        def mean(layer, h, sel=sel):
            return torch.einsum("bt,btd->bd", sel, h.float())  # (B, D)

        got = hooked_prefill(model, ids, mask, layers, component, mean)
        out.append(torch.stack([got[layer] for layer in layers], dim=1).cpu())  # (B, L, D)
        if progress is not None:
            progress(start + len(chunk))
    return torch.cat(out).numpy()

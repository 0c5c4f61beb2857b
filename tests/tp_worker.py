"""One rank of the TP test: projects both components and probes the hooked tensors."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def _probe(model, seqs, layers, component) -> dict:
    """What the hooks see at each layer under TP: its type, its width, and whether every rank
    sees the same values (a partial sum would differ between ranks)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from raypipe.engine.hooks import hooked_prefill, pad_right

    ids, mask = pad_right(seqs, 0, torch.device("cpu"))
    got = hooked_prefill(model, ids, mask, layers, component, lambda layer, h: h)
    out = {}
    for layer in layers:
        h = got[layer]  # (B, T, D)
        full = h.full_tensor() if isinstance(h, DTensor) else h
        copies = [torch.empty_like(full) for _ in range(dist.get_world_size())]
        dist.all_gather(copies, full.contiguous())
        out[str(layer)] = {
            "dtensor": isinstance(h, DTensor),
            "width": int(h.shape[-1]),
            "rank_spread": max(float((c - copies[0]).abs().max()) for c in copies),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from raypipe.engine.models import ModelSpec
    from raypipe.engine.tp import TPProjector

    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--inputs", required=True, help="JSON: seqs, vectors, layers")
    p.add_argument("--out", required=True, help="folder for rank 0's results")
    args = p.parse_args(argv)
    inputs = json.loads(Path(args.inputs).read_text())
    spec = ModelSpec(args.model, Path(args.out) / "cache", dtype="float32", device="cpu")
    seqs, vectors, layers = inputs["seqs"], inputs["vectors"], inputs["layers"]
    report: dict = {"probe": {}}
    arrays: dict[str, np.ndarray] = {}
    engines = []
    for component in ("residual", "attn_contribution"):
        eng = TPProjector(
            args.rank, args.world, "127.0.0.1", args.port, spec, vectors, component, threads=1
        )
        engines.append(eng)
        # Early stop at the top layer, then a second call: a collective left hanging by the
        # stop would deadlock here or garble the all-reduce check below.
        first = eng.project(seqs)
        again = eng.project(seqs[:1])
        report["probe"][component] = _probe(eng.model, seqs, layers, component)
        if args.rank == 0:
            for i, res in enumerate(first[0]):
                arrays[f"{component}/scores/{i}"] = res.scores  # (S, T)
                arrays[f"{component}/norms/{i}"] = res.norms  # (S, T)
            arrays[f"{component}/again/0"] = again[0][0].scores
        else:
            assert first is None and again is None, "only rank 0 returns scores"
    check = torch.tensor([float(args.rank + 1)])
    dist.all_reduce(check)
    report["all_reduce"] = float(check)
    report["tp_size"] = engines[0].model.tp_size
    o_proj = engines[0].model.model.layers[0].self_attn.o_proj.weight  # (D, D / world) locally
    report["o_proj_local"] = list(o_proj.to_local().shape)
    dist.barrier()
    engines[0].close()
    report["closed"] = not dist.is_initialized()
    if args.rank == 0:
        np.savez(Path(args.out) / "scores.npz", **arrays)
    (Path(args.out) / f"rank{args.rank}.json").write_text(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The hooked projector: one prefill, every trait of a layer scored in one matmul on the device."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from raypipe.engine.batching import overhead_tokens, plan_batches, weight_bytes
from raypipe.engine.hooks import hooked_prefill, layer_devices, model_device, pad_right


@dataclass
class SequenceScores:
    """Scores for one sequence, one row per vector (in the order the vectors were given)."""

    scores: np.ndarray  # (S, T) float32: h_t . v^
    norms: np.ndarray  # (S, T) float32: |h_t| at that vector's layer
    cleaned_scores: np.ndarray | None = None  # (S, T) with massive dims removed
    cleaned_norms: np.ndarray | None = None  # (S, T)


class Projector:
    """Projects hooked hidden states onto unit vectors; only scores leave the device.

    A model split over devices (device_map) keeps each layer's vectors on that layer's device;
    the per-layer results meet on the first hooked layer's device before one host transfer.
    """

    def __init__(
        self,
        model: nn.Module,
        vectors: list[tuple[int, list[float] | torch.Tensor]],  # (layer, vector) per row
        component: str = "residual",
        massive_dims: list[int] | None = None,
        early_stop: bool = True,
        max_batch_tokens: int = 16384,
        pad_id: int = 0,
        compile: bool = False,  # torch.compile the decoder blocks for the prefill (see hooks)
    ):
        if not vectors:
            raise ValueError("Projector needs at least one vector")
        self.model = model
        self.component = component
        self.early_stop = early_stop
        self.max_batch_tokens = max_batch_tokens
        self.pad_id = pad_id
        self.compile = compile
        self.device = model_device(model)  # where input ids go
        self.overhead = overhead_tokens(
            model.config, self.device.type, weight_bytes(model)
        )  # per prefill batch
        self.layers = sorted({layer for layer, _ in vectors})
        self.n = len(vectors)
        self.layer_device = layer_devices(model, self.layers, component)
        self.out_device = self.layer_device[self.layers[0]]
        # Group rows by layer: one (D, K_L) matrix per layer; `inverse` maps back to input rows.
        self.bank: dict[int, torch.Tensor] = {}
        grouped: list[int] = []
        for layer in self.layers:
            rows = [i for i, (lay, _) in enumerate(vectors) if lay == layer]
            mat = torch.stack([torch.as_tensor(vectors[i][1], dtype=torch.float32) for i in rows])
            mat = mat / mat.norm(dim=1, keepdim=True)  # (K_L, D) unit rows
            self.bank[layer] = mat.T.contiguous().to(self.layer_device[layer])  # (D, K_L)
            grouped.extend(rows)
        inverse = torch.empty(self.n, dtype=torch.long)
        inverse[torch.tensor(grouped)] = torch.arange(self.n)
        self.inverse = inverse.to(self.out_device)  # (S,) once, not per batch
        self.norm_rows = torch.tensor(
            [self.layers.index(vectors[i][0]) for i in range(self.n)], dtype=torch.long
        )
        self.dims: dict[int, torch.Tensor] | None = None  # {layer: (M,)} on its device
        if massive_dims:
            dims = torch.tensor(sorted(set(massive_dims)), dtype=torch.long)
            self.dims = {layer: dims.to(self.layer_device[layer]) for layer in self.layers}

    def _rehome(self, layer: int, device: torch.device) -> None:
        # A hand-made device_map can run a block elsewhere than its weights said; follow the
        # hidden state once rather than fail in the matmul.
        self.layer_device[layer] = device
        self.bank[layer] = self.bank[layer].to(device)
        if self.dims is not None:
            self.dims[layer] = self.dims[layer].to(device)

    def _on_layer(self, layer: int, h: torch.Tensor):  # h: (B, T, D) in the model dtype
        hf = h.float()
        if hf.device != self.layer_device[layer]:
            self._rehome(layer, hf.device)
        return layer_scores(hf, self.bank[layer], None if self.dims is None else self.dims[layer])

    def _batches(self, lengths: list[int]) -> list[list[int]]:
        return plan_batches(lengths, self.max_batch_tokens, overhead_tokens=self.overhead)

    @torch.inference_mode()
    def project(self, seqs: list[list[int]]) -> list[SequenceScores]:
        out: list[SequenceScores | None] = [None] * len(seqs)
        for batch in self._batches([len(s) for s in seqs]):
            for i, res in zip(batch, self._project_batch([seqs[i] for i in batch])):
                out[i] = res
        return out  # type: ignore[return-value]

    def _project_batch(self, seqs: list[list[int]]) -> list[SequenceScores]:
        ids, mask = pad_right(seqs, self.pad_id, self.device)
        got = hooked_prefill(
            self.model,
            ids,
            mask,
            self.layers,
            self.component,
            self._on_layer,
            self.early_stop,
            compile=self.compile,
        )
        parts = [
            _gather(kind, self.out_device) for kind in zip(*(got[layer] for layer in self.layers))
        ]
        # One transfer per tensor kind: (B, T, S) scores and (B, T, n_layers) squared norms.
        scores = torch.cat(parts[0], dim=-1)[..., self.inverse].cpu().numpy()
        norms = torch.stack(parts[1], dim=-1).clamp_min(0).sqrt().cpu().numpy()
        rows = self.norm_rows.numpy()
        cleaned = None
        if self.dims is not None:
            cs = torch.cat(parts[2], dim=-1)[..., self.inverse].cpu().numpy()
            cn = torch.stack(parts[3], dim=-1).clamp_min(0).sqrt().cpu().numpy()
            cleaned = (cs, cn)
        results = []
        for b, s in enumerate(seqs):
            n = len(s)
            res = SequenceScores(
                scores=np.ascontiguousarray(scores[b, :n].T),
                norms=np.ascontiguousarray(norms[b, :n][:, rows].T),
            )
            if cleaned is not None:
                res.cleaned_scores = np.ascontiguousarray(cleaned[0][b, :n].T)
                res.cleaned_norms = np.ascontiguousarray(cleaned[1][b, :n][:, rows].T)
            results.append(res)
        return results


def layer_scores(
    hf: torch.Tensor,  # (..., D) fp32 states
    vec: torch.Tensor,  # (D, K) unit columns
    dims: torch.Tensor | None = None,  # (M,) massive dims
) -> list[torch.Tensor]:
    """[scores (..., K), squared norms (...)], and with `dims` the same two with those dims
    removed: the one place the projection math lives (the projector, and fromacts for saved
    activations, so stream-through and re-projection agree)."""
    scores = hf @ vec
    # vector_norm reduces in one pass; (hf * hf).sum(-1) took 9x as long on CPU and cost a
    # third of a 135M model's layer per hooked layer.
    sq = torch.linalg.vector_norm(hf, dim=-1).square()
    out = [scores, sq]
    if dims is not None:
        hm = hf.index_select(-1, dims)  # (..., M)
        out += [
            scores - hm @ vec.index_select(0, dims),
            sq - torch.linalg.vector_norm(hm, dim=-1).square(),
        ]
    return out


def _gather(tensors: tuple[torch.Tensor, ...], device: torch.device) -> list[torch.Tensor]:
    # Device-to-device copies queue on the stream: no host sync, unlike a .cpu() per layer.
    return [t if t.device == device else t.to(device) for t in tensors]

"""Raw-activation capture: one hooked prefill per token budget, per-sequence tensors on CPU."""

from __future__ import annotations

import torch
from torch import nn

# The same batch plan as the Projector: capturing and projecting the same sequences run the
# very same padded batches, so hidden states (and scores) agree bit for bit.
from raypipe.engine.batching import overhead_tokens, plan_batches, weight_bytes
from raypipe.engine.hooks import COMPONENTS, decoder_layers, hooked_prefill, model_device, pad_right


class Capturer:
    """Captures the hooked component's output at chosen layers, in the model dtype, on the host."""

    def __init__(
        self,
        model: nn.Module,
        layers: list[int],
        component: str = "residual",
        max_batch_tokens: int = 16384,
        pad_id: int = 0,
        compile: bool = False,  # torch.compile the decoder blocks for the prefill (see hooks)
    ):
        if component not in COMPONENTS:
            raise ValueError(f"unknown component {component!r}; expected one of {COMPONENTS}")
        if not layers:
            raise ValueError("Capturer needs at least one layer")
        depth = len(decoder_layers(model))
        bad = [layer for layer in layers if not 0 <= int(layer) < depth]
        if bad:
            raise ValueError(f"layers {bad} outside the model's 0-{depth - 1}")
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be at least 1")
        self.model = model
        self.layers = sorted({int(layer) for layer in layers})
        self.component = component
        self.max_batch_tokens = max_batch_tokens
        self.pad_id = pad_id
        self.compile = compile
        # Input ids only: _to_host copies each layer from wherever a split model ran it.
        self.device = model_device(model)
        self.overhead = overhead_tokens(
            model.config, self.device.type, weight_bytes(model)
        )  # per prefill batch

    @staticmethod
    def _to_host(layer: int, h: torch.Tensor) -> torch.Tensor:  # h: (B, T, D) model dtype
        # Copied inside the hook: one transfer per layer per batch, device memory is freed as
        # the pass goes on, and no later in-place op in the model can change what we keep.
        return h.detach().to("cpu", copy=True)

    @torch.inference_mode()
    def capture(self, seqs: list[list[int]]) -> list[dict[int, torch.Tensor]]:
        """Per sequence `{layer: (T, D)}` in the model dtype, real tokens only, own storage."""
        if any(len(s) == 0 for s in seqs):
            raise ValueError("cannot capture an empty sequence")
        out: list[dict[int, torch.Tensor] | None] = [None] * len(seqs)
        lengths = [len(s) for s in seqs]
        for batch in plan_batches(lengths, self.max_batch_tokens, overhead_tokens=self.overhead):
            for i, acts in zip(batch, self._capture_batch([seqs[i] for i in batch])):
                out[i] = acts
        return out  # type: ignore[return-value]

    def _capture_batch(self, seqs: list[list[int]]) -> list[dict[int, torch.Tensor]]:
        ids, mask = pad_right(seqs, self.pad_id, self.device)  # (B, T), (B, T)
        got = hooked_prefill(
            self.model,
            ids,
            mask,
            self.layers,
            self.component,
            self._to_host,
            early_stop=True,
            compile=self.compile,
        )  # {layer: (B, T, D) on CPU}
        # clone(): a slice is a view of the whole batch, and torch.save would write all of it.
        return [
            {
                layer: got[layer][b, : len(s)].clone(memory_format=torch.contiguous_format)
                for layer in self.layers
            }
            for b, s in enumerate(seqs)
        ]

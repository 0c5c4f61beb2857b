"""Massive-activation statistics over prefill tokens at every decoder block (SPEC section 8)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from raypipe.engine.hooks import (
    MASK_READERS,
    decoder_layers,
    decoder_stack,
    hook_point,
    hooked_prefill,
    make_hook,
)

REFERENCES = ("layer", "token")
TOP_K = 5


# What passive collection (a projection run's first prefills) flags as massive: the
# collector's defaults, which a saved running state must match to be carried on.
DEFAULT_CRITERION = {"threshold": 100.0, "ratio": 1000.0, "reference": "layer", "min_fraction": 0.5}
_TENSORS = ("sum", "sum_abs", "max_abs", "massive_tokens", "massive_sequences", "norm_sum")


class _LayerStats:
    """Running fp32 sums for one layer, kept on the device of its hidden states."""

    def __init__(self, dim: int, device: torch.device):
        self.tokens = 0
        self.sequences = 0
        self.sum = torch.zeros(dim, dtype=torch.float32, device=device)  # (D,) signed
        self.sum_abs = torch.zeros(dim, dtype=torch.float32, device=device)  # (D,)
        self.max_abs = torch.zeros(dim, dtype=torch.float32, device=device)  # (D,)
        self.massive_tokens = torch.zeros(dim, dtype=torch.long, device=device)  # (D,)
        self.massive_sequences = torch.zeros(dim, dtype=torch.long, device=device)  # (D,)
        self.norm_sum = torch.zeros((), dtype=torch.float32, device=device)
        self.medians: list[torch.Tensor] = []  # (N_i,) median |h| of each token seen

    def state(self) -> dict:
        out = {k: getattr(self, k).detach().cpu().clone() for k in _TENSORS}
        medians = torch.cat(self.medians) if self.medians else torch.zeros(0)
        return {**out, "tokens": self.tokens, "sequences": self.sequences, "medians": medians.cpu()}

    @classmethod
    def from_state(cls, state: dict) -> _LayerStats:
        st = cls(int(state["sum_abs"].numel()), torch.device("cpu"))
        st.tokens, st.sequences = int(state["tokens"]), int(state["sequences"])
        for k in _TENSORS:
            setattr(st, k, state[k].to(getattr(st, k).dtype))
        st.medians = [state["medians"].float()]
        return st

    def to(self, device: torch.device) -> _LayerStats:
        for k in _TENSORS:
            setattr(self, k, getattr(self, k).to(device))
        self.medians = [m.to(device) for m in self.medians]
        return self


class _MaskReader:
    """The collector's place in hooks.MASK_READERS, removed like a hook handle."""

    def __init__(self, stack: torch.nn.Module):
        self.stack = stack

    def remove(self) -> None:
        left = MASK_READERS.get(self.stack, 0) - 1
        if left > 0:
            MASK_READERS[self.stack] = left
        else:
            MASK_READERS.pop(self.stack, None)


class CalibrationCollector:
    """Per-layer statistics of the residual stream, for finding massive dims.

    A value h_d of a token counts as massive (Sun et al. 2024) when |h_d| > `threshold` and
    |h_d| >= `ratio` x the reference median. With `reference="layer"` (default) that median is
    the median over the forward's real tokens of each token's median |h|: the hidden state of
    the sequence, as in the paper. `reference="token"` uses the token's own median instead;
    it misses the usual case, because the attention-sink token that carries the massive value
    has its whole hidden state inflated (SmolLM2-135M: median 50 there, about 1.6 elsewhere).

    A dim is reported massive at a layer when it held a massive value in at least
    `min_fraction` of the sequences that reached that layer. Massive activations sit on a
    few fixed tokens (the first token, the first delimiter) in nearly every input, so a
    per-sequence rate is stable whatever the prompt length, where a per-token rate would
    drop below any cutoff for long responses.

    Use `observe(ids, mask)` for explicit forwards, or `attach()`/`detach()` (see `passive`)
    to collect from whatever prefills run on the model. Either way collection stops after
    `budget` real tokens, and attached hooks then remove themselves.
    """

    def __init__(
        self,
        model: nn.Module | None,
        budget: int = 5000,
        threshold: float = DEFAULT_CRITERION["threshold"],
        ratio: float = DEFAULT_CRITERION["ratio"],
        min_fraction: float = DEFAULT_CRITERION["min_fraction"],
        reference: str = DEFAULT_CRITERION["reference"],
        n_layers: int | None = None,  # without a model (observe_states): its depth
    ):
        if budget < 1:
            raise ValueError("calibration budget must be at least 1 token")
        if reference not in REFERENCES:
            raise ValueError(f"unknown reference {reference!r}; expected one of {REFERENCES}")
        if not 0 < min_fraction <= 1:
            raise ValueError("min_fraction must be in (0, 1]")
        self.model = model
        self.budget = budget
        self.threshold = float(threshold)
        self.ratio = float(ratio)
        self.min_fraction = float(min_fraction)
        self.reference = reference
        self.n_layers = len(decoder_layers(model)) if model is not None else int(n_layers)
        self.stats: dict[int, _LayerStats] = {}
        self.tokens_seen = 0  # real tokens admitted; every hooked layer sees the same ones
        self.prompts_seen = 0
        self._handles: list[Any] = []
        self._sink: dict[int, Any] = {}
        # Per forward: the mask handed to the decoder stack, then which tokens are taken.
        self._mask: torch.Tensor | None = None
        self._skip = False
        self._select: torch.Tensor | None = None  # (B, T) bool, set at the first hooked layer
        self._fresh = False

    @property
    def done(self) -> bool:
        return self.tokens_seen >= self.budget

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    @property
    def criterion(self) -> dict:
        return {
            "threshold": self.threshold,
            "ratio": self.ratio,
            "reference": self.reference,
            "min_fraction": self.min_fraction,
        }

    # --- running state, to go on counting in another process -----------------------------

    def state_dict(self) -> dict:
        """The running sums and counts, on the CPU, in types `torch.load(weights_only=True)`
        reads back: a collection a killed run left goes on from here (load_state_dict)."""
        with torch.inference_mode():
            layers = {str(layer): st.state() for layer, st in self.stats.items()}
        return {
            "budget": self.budget,
            "criterion": self.criterion,
            "tokens_seen": self.tokens_seen,
            "prompts_seen": self.prompts_seen,
            "layers": layers,
        }

    def load_state_dict(self, state: dict) -> None:
        """Carry on from `state_dict()`; it must come from the same budget and criterion."""
        if self.attached:
            raise RuntimeError("load_state_dict() while attached")
        if state["budget"] != self.budget or state["criterion"] != self.criterion:
            raise ValueError(
                f"calibration state for budget {state['budget']} and {state['criterion']}, "
                f"not {self.budget} and {self.criterion}"
            )
        self.tokens_seen = int(state["tokens_seen"])
        self.prompts_seen = int(state["prompts_seen"])
        self.stats = {int(k): _LayerStats.from_state(v) for k, v in state["layers"].items()}

    # --- explicit forwards -------------------------------------------------------------

    def observe(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, T), 1 = real token
    ) -> int:
        """One forward of the decoder stack with stats at every layer; returns tokens taken."""
        if self.done:
            return 0
        if self.attached:
            raise RuntimeError("observe() while attached would count the forward twice")
        self._start_forward(attention_mask, skip=False)
        before = self.tokens_seen
        try:
            hooked_prefill(
                self.model,
                input_ids,
                attention_mask,
                list(range(self.n_layers)),
                "residual",
                self._on_layer,
                early_stop=False,
            )
        finally:
            self._mask = self._select = None
        return self.tokens_seen - before

    def observe_states(
        self,
        states: dict[int, torch.Tensor],  # {layer: (B, T, D)} every block's residual
        attention_mask: torch.Tensor,  # (B, T), 1 = real token
    ) -> int:
        """The same statistics from a forward computed elsewhere (vLLM's hooks): the residual
        of every block for one padded batch; returns tokens taken."""
        if self.done:
            return 0
        if sorted(states) != list(range(self.n_layers)):
            raise ValueError(
                f"observe_states needs all {self.n_layers} layers, got {sorted(states)}"
            )
        self._start_forward(attention_mask, skip=False)
        before = self.tokens_seen
        try:
            for layer in range(self.n_layers):
                self._on_layer(layer, states[layer])
        finally:
            self._mask = self._select = None
        return self.tokens_seen - before

    # --- passive collection ------------------------------------------------------------

    def attach(self) -> CalibrationCollector:
        """Hook the decoder stack and every block, so later prefills feed the collector."""
        if self.attached or self.done:
            return self
        stack = decoder_stack(self.model)
        try:
            self._handles.append(stack.register_forward_pre_hook(self._on_stack, with_kwargs=True))
            MASK_READERS[stack] = MASK_READERS.get(stack, 0) + 1
            self._handles.append(_MaskReader(stack))
            for layer, block in enumerate(decoder_layers(self.model)):
                hook = make_hook(layer, self._sink, self._on_layer, stop=False)
                self._handles.append(hook_point(block, "residual").register_forward_hook(hook))
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        for handle in self._handles:  # hooks, and the stack's count of mask readers
            handle.remove()
        self._handles.clear()
        self._sink.clear()

    def _on_stack(self, module, args, kwargs):
        if self.done:
            # The budget ran out in an earlier forward that stopped before the last layer.
            self.detach()
            return None
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        past = kwargs.get("past_key_values")
        # A decode step of generate() carries a non-empty cache: not a prefill token.
        decoding = past is not None and hasattr(past, "get_seq_length") and past.get_seq_length()
        self._start_forward(mask, skip=bool(decoding))
        return None

    # --- shared per-layer accumulation --------------------------------------------------

    def _start_forward(self, mask: torch.Tensor | None, skip: bool) -> None:
        self._mask = mask
        self._skip = skip
        self._select = None
        self._fresh = True

    def _selection(self, h: torch.Tensor) -> torch.Tensor:  # h: (B, T, D) -> (B, T) bool
        """Real tokens of this forward, cut to what is left of the budget (in row order)."""
        b, t = h.shape[:2]
        mask = self._mask
        if mask is None:
            keep = torch.ones((b, t), dtype=torch.bool, device=h.device)
        else:
            if mask.dim() != 2 or mask.shape[0] != b or mask.shape[1] < t:
                raise ValueError(
                    f"calibration needs a (batch, length) attention mask; got shape "
                    f"{tuple(mask.shape)} for hidden states {tuple(h.shape)}"
                )
            keep = mask[:, -t:].to(device=h.device) != 0  # generate() masks may be longer
        left = self.budget - self.tokens_seen
        if int(keep.sum()) > left:
            order = keep.flatten().cumsum(0).view(b, t)
            keep = keep & (order <= left)
        return keep

    def _on_layer(self, layer: int, h: torch.Tensor) -> None:  # h: (B, T, D)
        with torch.inference_mode():
            if self._skip or (self._select is None and not self._fresh):
                return
            if self._select is None:
                self._select = self._selection(h)
                self._fresh = False
                taken = int(self._select.sum())
                self.tokens_seen += taken
                self.prompts_seen += int(self._select.any(dim=1).sum())
            self._accumulate(layer, h, self._select)
            if self.done and layer == self.n_layers - 1 and self.attached:
                self.detach()

    def _accumulate(self, layer: int, h: torch.Tensor, select: torch.Tensor) -> None:
        rows = select.nonzero()[:, 0]  # (N,) batch row of each taken token
        if rows.numel() == 0:
            return
        signed = h.detach()[select].float()  # (N, D)
        x = signed.abs()
        st = self.stats.get(layer)
        if st is None:
            st = self.stats[layer] = _LayerStats(x.shape[1], x.device)
        elif st.sum_abs.device != x.device:
            st.to(x.device)  # loaded from a saved state (on the CPU)
        med = x.median(dim=-1).values  # (N,) lower median for an even D
        ref = med.median() if self.reference == "layer" else med[:, None]
        massive = (x > self.threshold) & (x >= self.ratio * ref)  # (N, D)
        per_row = torch.zeros(select.shape[0], x.shape[1], dtype=torch.long, device=x.device)
        per_row.index_add_(0, rows, massive.long())  # (B, D)
        st.tokens += x.shape[0]
        st.sequences += int(select.any(dim=1).sum())
        st.sum += signed.sum(0)
        st.sum_abs += x.sum(0)
        torch.maximum(st.max_abs, x.max(0).values, out=st.max_abs)
        st.massive_tokens += massive.sum(0)
        st.massive_sequences += (per_row > 0).sum(0)
        st.norm_sum += torch.linalg.vector_norm(x, dim=-1).sum()
        st.medians.append(med)

    # --- result ---------------------------------------------------------------------------

    def result(self) -> dict:
        """`{tokens_seen, aggregate}` in the calibration.json layout trait-interp writes and its
        viewer plots (SPEC 8): top dims ranked by |mean h_d| (the signed mean), per candidate
        dim a list over layers of |mean h_d| / mean_d'|mean h_d'|, layer norms, the cosine of
        consecutive layers' mean states; raypipe adds `massive_dims` and the per-layer detail.
        Layers never reached are left out (a projector that stops early never runs the blocks
        above its top layer)."""
        with torch.inference_mode():
            top_dims: dict[str, list[int]] = {}
            norms: dict[str, float] = {}
            medians: dict[str, float] = {}
            by_layer: dict[str, list[dict]] = {}
            means: dict[int, torch.Tensor] = {}
            flagged: set[int] = set()
            for layer in sorted(self.stats):
                st = self.stats[layer]
                key = str(layer)
                mean = st.sum / st.tokens  # (D,) signed mean state
                means[layer] = mean
                mean_abs = st.sum_abs / st.tokens  # (D,)
                k = min(TOP_K, mean.numel())
                top_dims[key] = mean.abs().topk(k).indices.tolist()
                norms[key] = float(st.norm_sum) / st.tokens
                median = float(torch.cat(st.medians).median())
                medians[key] = median
                need = self.min_fraction * st.sequences
                dims = (st.massive_sequences >= need).nonzero().flatten()
                dims = dims[st.max_abs[dims].argsort(descending=True)].tolist()
                entries = []
                for d in dims:
                    peak = float(st.max_abs[d])
                    entries.append(
                        {
                            "dim": d,
                            "max": peak,
                            "mean": float(mean_abs[d]),
                            "median": median,
                            "ratio": peak / median if median > 0 else None,
                            "massive_tokens": int(st.massive_tokens[d]),
                            "sequence_fraction": int(st.massive_sequences[d]) / st.sequences,
                        }
                    )
                by_layer[key] = entries
                flagged.update(dims)
            layers = sorted(means)
            magnitude: dict[str, list[float]] = {}
            for d in sorted({d for dims in top_dims.values() for d in dims}):
                row = []
                for layer in layers:
                    avg = float(means[layer].abs().mean())
                    row.append(abs(float(means[layer][d])) / avg if avg > 0 else 0.0)
                magnitude[str(d)] = row
            cosine = {
                str(a): float(torch.nn.functional.cosine_similarity(means[a], means[b], dim=0))
                for a, b in zip(layers, layers[1:])
            }
        return {
            "tokens_seen": self.tokens_seen,
            "aggregate": {
                "n_prompts": self.prompts_seen,
                "top_dims_by_layer": top_dims,
                "dim_magnitude_by_layer": magnitude,
                "layer_norms": norms,
                "consecutive_cosine": cosine,
                "massive_dims": sorted(flagged),
                "massive_by_layer": by_layer,
                "layer_medians": medians,
                "criterion": {
                    "threshold": self.threshold,
                    "ratio": self.ratio,
                    "reference": self.reference,
                    "min_fraction": self.min_fraction,
                },
            },
        }


@contextmanager
def passive(
    model: nn.Module,
    budget: int = 5000,
    ratio: float = 1000.0,
    min_fraction: float = 0.5,
    reference: str = "layer",
) -> Iterator[CalibrationCollector]:
    """Collect from every prefill run on `model` inside the block, until `budget` tokens;
    the hooks come off when the budget is met, and in any case when the block exits."""
    collector = CalibrationCollector(
        model, budget=budget, ratio=ratio, min_fraction=min_fraction, reference=reference
    )
    collector.attach()
    try:
        yield collector
    finally:
        collector.detach()

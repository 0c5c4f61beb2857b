"""Projection inside vLLM's own model: the worker side of one-pass monitoring.

`MonitorWorker` is given to vLLM as `worker_extension_cls`: vLLM mixes it into its worker class
(every tensor-parallel rank), and the engine reaches it with `collective_rpc`. Installing puts
forward hooks on the decoder layers of the model the worker holds. Each forward step (a prefill
chunk, decodes, or both mixed) the hooks score every row of the step on the device, with the
same math as the HF projector (projector.layer_scores), and keep per request only the scores and
squared norms, on the host, by absolute position. `raypipe_collect` hands them over as bytes
(pickled numpy arrays; vLLM's RPC should carry no tensors) and forgets them.

Facts this rests on (vllm 0.32, see docs/vllm.md):
- Hooks fire only in eager mode (`enforce_eager=True`); compiled graphs skip them silently.
- An exception in a hook kills the engine: the hooks catch everything and report it at collect.
- vLLM's Llama-style decoder layer returns (mlp_out, residual): their sum is the block output,
  HF's hidden_states[L+1] (before the final norm, as the HF projector's hook sees it).
- Which rows belong to which request is the model runner's: `req_ids`, `query_start_loc` and
  `num_computed_tokens` of the step. V1 and V2 runners keep them in different places; both are
  read right after the runner prepares its inputs (`_prepare_inputs` / `prepare_inputs`), so a
  dummy step (no request) is never attributed to the last real one.
- After the all-reduce the residual is whole on every tensor-parallel rank: rank 0 alone hooks.
"""

from __future__ import annotations

import pickle
import traceback
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from raypipe.engine.hooks import hook_point
from raypipe.engine.projector import layer_scores

COMPONENT_POINTS = {"residual": "block", "attn_contribution": "attention"}
TRACE_STEPS = 4096  # steps whose request ids raypipe_trace keeps


@dataclass
class Layout:
    """Rows of one forward step: request i owns rows qsl[i]:qsl[i+1], positions start[i]..."""

    req_ids: list[str]
    qsl: np.ndarray  # (R + 1,) int
    start: np.ndarray  # (R,) int: tokens of each request computed before this step


def _v1_layout(runner) -> Layout:
    n = runner.input_batch.num_reqs
    return Layout(
        list(runner.input_batch.req_ids[:n]),
        np.array(runner.query_start_loc.np[: n + 1], dtype=np.int64),
        np.array(runner.input_batch.num_computed_tokens_cpu[:n], dtype=np.int64),
    )


def _v2_layout(batch) -> Layout:
    n = batch.num_reqs
    return Layout(
        list(batch.req_ids[:n]),
        np.array(batch.query_start_loc_np[: n + 1], dtype=np.int64),
        np.array(batch.num_computed_tokens_np[:n], dtype=np.int64),
    )


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a vLLM model (`model.model.layers` for the Llama family)."""
    for _, module in model.named_modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and hasattr(module, "embed_tokens"):
            return layers
    raise TypeError(f"{type(model).__name__}: no decoder stack with .layers and .embed_tokens")


def hook_module(block: torch.nn.Module, component: str) -> torch.nn.Module:
    """Where vLLM's block computes the component: hooks.hook_point's rule, with vLLM's
    attention module standing for its o_proj (which returns an (output, bias) pair)."""
    return hook_point(block, component, whole_attention=True)


def _hidden(output, component: str) -> torch.Tensor:
    if isinstance(output, tuple | list):
        if component == "residual" and len(output) == 2 and output[1] is not None:
            return output[0] + output[1]  # (N, D): vLLM defers the residual add to the next norm
        output = output[0]
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        raise TypeError(f"hooked module returned {type(output).__name__}, not an (N, D) tensor")
    return output


class _Hooks:
    """Hooks on some decoder layers of one worker's model, the layout tap, and what they kept:
    per request, chunks of rows by absolute position. Subclasses say what a step keeps."""

    def __init__(self, runner, component: str, layers: list[int], only: str | None = None):
        self.runner = runner
        self.component = component
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        blocks = decoder_layers(model)
        self.device = next(model.parameters()).device
        self.layers = sorted(set(layers))
        if self.layers[-1] >= len(blocks) or self.layers[0] < 0:
            bad = self.layers[-1] if self.layers[-1] >= len(blocks) else self.layers[0]
            raise ValueError(f"layer {bad} is not in a model of {len(blocks)} layers")
        self.top = self.layers[-1]
        self.layout: Layout | None = None
        self.step: dict[int, object] = {}
        self.store: dict[str, list] = {}  # req_id -> chunks, see _keep
        # Request ids of each recorded step (the latest ones): which requests shared a step.
        self.trace: deque[tuple[str, ...]] = deque(maxlen=TRACE_STEPS)
        self.error: str | None = None
        self.only = only  # keep only requests whose id starts with this (None: all)
        self.rows: torch.Tensor | None = None  # the step's rows of those requests, when `only`
        self.handles = [
            hook_module(blocks[layer], component).register_forward_hook(self._hook(layer))
            for layer in self.layers
        ]

    def set_layout(self, lay: Layout | None) -> None:
        """The step about to run (from the worker's tap); with `only`, its requests narrowed
        to those wanted, or None when the step holds none of them."""
        self.layout, self.step = lay, {}
        if lay is None or self.only is None:
            return
        keep = [i for i, rid in enumerate(lay.req_ids) if rid.startswith(self.only)]
        if not keep:
            self.layout = None
            return
        spans = [np.arange(lay.qsl[i], lay.qsl[i + 1]) for i in keep]
        sizes = np.array([len(x) for x in spans], dtype=np.int64)
        self.rows = torch.from_numpy(np.concatenate(spans)).to(self.device)
        self.layout = Layout(
            [lay.req_ids[i] for i in keep],
            np.concatenate([[0], np.cumsum(sizes)]),
            lay.start[keep],
        )

    def _hook(self, layer: int):
        def hook(module, args, output):
            if self.error is not None or self.layout is None:
                return None
            try:
                h = _hidden(output, self.component)
                rows = int(self.layout.qsl[-1])
                if self.only is not None:
                    h = h.index_select(0, self.rows)  # (N, D) the wanted requests' rows
                elif rows > h.shape[0]:
                    raise RuntimeError(f"layer {layer}: step has {h.shape[0]} rows, layout {rows}")
                self.step[layer] = self._on_layer(layer, h[:rows])
                if layer == self.top:
                    self._finish_step()
            except Exception:
                self.error = traceback.format_exc()
            return None

        return hook

    def _on_layer(self, layer: int, h: torch.Tensor):  # h: (N, D) the step's rows
        raise NotImplementedError

    def _step_rows(self, parts: list) -> object:
        """The step's kept rows, sliceable by row: what `_keep` splits among the requests."""
        raise NotImplementedError

    def _finish_step(self) -> None:
        lay, parts = self.layout, [self.step[layer] for layer in self.layers]
        self.layout, self.step = None, {}
        block = self._step_rows(parts)
        self.trace.append(tuple(lay.req_ids))
        for i, rid in enumerate(lay.req_ids):
            a, b = int(lay.qsl[i]), int(lay.qsl[i + 1])
            if b > a:
                pos = np.arange(lay.start[i], lay.start[i] + b - a, dtype=np.int64)
                self.store.setdefault(rid, []).append(self._keep(pos, block, a, b))

    def _keep(self, pos: np.ndarray, block, a: int, b: int):
        raise NotImplementedError

    def _joined(self, chunks: list):
        raise NotImplementedError

    def collect(self, external_ids: list[str] | None, drop_rest: bool) -> dict:
        if self.error is not None:
            error, self.error = self.error, None
            self.store.clear()
            raise RuntimeError(f"raypipe's vLLM hooks failed:\n{error}")
        wanted = None if external_ids is None else set(external_ids)
        out = {}
        for rid in list(self.store):
            ext = rid if wanted is None or rid in wanted else external_id(rid)
            if wanted is None or ext in wanted:
                out[ext] = self._joined(self.store.pop(rid))
        if drop_rest:
            self.store.clear()
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class _Scorer(_Hooks):
    """Scores and norms of every row onto the unit vectors of its layer, on the device."""

    def __init__(self, runner, cfg: dict):
        vectors = cfg["vectors"]  # [(layer, np.ndarray (D,))]
        super().__init__(runner, cfg["component"], [layer for layer, _ in vectors])
        device = self.device
        self.n = len(vectors)
        self.bank: dict[int, torch.Tensor] = {}
        grouped: list[int] = []
        for layer in self.layers:
            rows = [i for i, (lay, _) in enumerate(vectors) if lay == layer]
            mat = torch.stack([torch.as_tensor(vectors[i][1], dtype=torch.float32) for i in rows])
            mat = mat / mat.norm(dim=1, keepdim=True)  # (K_L, D)
            self.bank[layer] = mat.T.contiguous().to(device)  # (D, K_L)
            grouped.extend(rows)
        inverse = torch.empty(self.n, dtype=torch.long)
        inverse[torch.tensor(grouped)] = torch.arange(self.n)
        self.inverse = inverse.to(device)
        self.norm_rows = torch.tensor(
            [self.layers.index(vectors[i][0]) for i in range(self.n)], dtype=torch.long
        ).to(device)
        dims = cfg.get("massive_dims")
        self.dims = None
        if dims:
            self.dims = torch.tensor(sorted(set(dims)), dtype=torch.long, device=device)

    def _on_layer(self, layer: int, h: torch.Tensor) -> list[torch.Tensor]:
        return layer_scores(h.float(), self.bank[layer], self.dims)

    def _step_rows(self, parts: list) -> np.ndarray:
        cols = []
        for kind in range(0, len(parts[0]), 2):  # (scores, sq) then (cleaned, cleaned sq)
            scores = torch.cat([p[kind] for p in parts], dim=-1)[:, self.inverse]  # (N, S)
            sq = torch.stack([p[kind + 1] for p in parts], dim=-1)[:, self.norm_rows]
            cols += [scores, sq.clamp_min(0).sqrt()]
        return torch.cat(cols, dim=-1).cpu().numpy()  # one host transfer per step

    def _keep(self, pos: np.ndarray, block: np.ndarray, a: int, b: int) -> np.ndarray:
        return np.concatenate([pos.astype(np.float32)[:, None], block[a:b]], axis=1)

    def _joined(self, chunks: list) -> np.ndarray:
        return np.concatenate(chunks)


class _Capturer(_Hooks):
    """The raw rows of the hooked component at each layer, in the model dtype, on the host."""

    def __init__(self, runner, cfg: dict):
        super().__init__(
            runner, cfg["component"], list(cfg["capture_layers"]), only=cfg.get("only")
        )

    def _on_layer(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        # Copied at once: no later in-place op of the model can change what is kept.
        return h.detach().to("cpu", copy=True)  # (N, D)

    def _step_rows(self, parts: list) -> list[torch.Tensor]:
        return parts

    def _keep(self, pos: np.ndarray, block: list, a: int, b: int):
        return pos, [t[a:b] for t in block]

    def _joined(self, chunks: list) -> tuple:
        """(positions (n,), {layer: (dtype name, (n, D) numpy)}): numpy has no bfloat16, so
        half types travel as their int16 bits."""
        pos = np.concatenate([c[0] for c in chunks])
        out = {}
        for k, layer in enumerate(self.layers):
            t = torch.cat([c[1][k] for c in chunks])
            name = str(t.dtype).removeprefix("torch.")
            out[layer] = (name, t.view(torch.int16).numpy() if t.element_size() == 2 else t.numpy())
        return pos, out


def external_id(internal: str) -> str:
    """The id a request was given: vLLM adds '-' and 8 random characters to it."""
    return internal.rsplit("-", 1)[0]


class _Tap:
    """Records each step's layout right after the runner prepares its inputs, for every
    installed hook set (one tap per worker, however many sets)."""

    def __init__(self, runner, sets: dict[str, _Hooks]):
        name = "prepare_inputs" if hasattr(runner, "req_states") else "_prepare_inputs"
        original = getattr(runner, name, None)
        if original is None:
            raise TypeError(f"{type(runner).__name__} has no {name}: an unknown model runner")
        v2 = name == "prepare_inputs"

        def tapped(*args, **kwargs):
            out = original(*args, **kwargs)
            try:
                lay = _v2_layout(out) if v2 else _v1_layout(runner)
            except Exception:  # never break the engine; the step goes unrecorded, and says so
                lay = None
                for hooks in sets.values():
                    hooks.error = hooks.error or traceback.format_exc()
            for hooks in sets.values():
                try:
                    hooks.set_layout(lay)
                except Exception:
                    hooks.error = hooks.error or traceback.format_exc()
                    hooks.layout = None
            return out

        setattr(runner, name, tapped)
        self.remove = lambda: vars(runner).pop(name, None)


class MonitorWorker:
    """vLLM `worker_extension_cls`: its methods become `collective_rpc` calls on every rank.

    Hook sets live in slots: "main" (the run's scores or capture) and any other (passive
    calibration: a capture of every layer, for requests whose ids start with its `only`)."""

    def _raypipe_sets(self) -> dict[str, _Hooks]:
        sets = getattr(self, "_raypipe_hooks", None)
        if sets is None:
            sets = self._raypipe_hooks = {}
            self._raypipe_tap = None
        return sets

    def raypipe_install(self, payload: bytes, slot: str = "main") -> int:
        """Hooks for `payload` (vectors, or capture layers) in `slot`, replacing what it held:
        rank 0 only."""
        self.raypipe_remove(slot)
        if getattr(self, "rank", 0) != 0:
            return 0
        cfg = pickle.loads(payload)
        kind = _Capturer if cfg.get("capture_layers") else _Scorer
        sets = self._raypipe_sets()
        sets[slot] = kind(self.model_runner, cfg)
        if self._raypipe_tap is None:
            self._raypipe_tap = _Tap(self.model_runner, sets)
        return len(sets[slot].handles)

    def raypipe_collect(
        self, external_ids: list[str] | None = None, drop_rest: bool = False, slot: str = "main"
    ) -> bytes:
        """{request id: rows} of the finished requests named (all when None), as bytes;
        `drop_rest`: forget every other request's rows too. Scoring hooks: (n, 1 + 2S [+ 2S])
        float32 rows: position, scores, norms [, cleaned scores, cleaned norms]. Capture
        hooks: (positions, {layer: (dtype, (n, D) array)}) (_Capturer._joined)."""
        hooks = self._raypipe_sets().get(slot)
        if hooks is None:
            return pickle.dumps(None)
        return pickle.dumps(hooks.collect(external_ids, drop_rest))

    def raypipe_drop(self) -> None:
        """Forget every request's rows (those of requests no caller waits for), keeping a
        hook error for the next collect."""
        for hooks in self._raypipe_sets().values():
            hooks.store.clear()

    def raypipe_trace(self) -> bytes:
        """The external request ids of each recent step (oldest first), then forgotten: which
        requests shared the engine's steps."""
        hooks = self._raypipe_sets().get("main")
        if hooks is None:
            return pickle.dumps(None)
        steps = [tuple(external_id(r) for r in step) for step in hooks.trace]
        hooks.trace.clear()
        return pickle.dumps(steps)

    def raypipe_remove(self, slot: str | None = None) -> None:
        """Removes the hooks of `slot` (None: every slot, and the tap)."""
        sets = self._raypipe_sets()
        for name in [slot] if slot is not None else list(sets):
            hooks = sets.pop(name, None)
            if hooks is not None:
                hooks.remove()
        if not sets and self._raypipe_tap is not None:
            self._raypipe_tap.remove()
            self._raypipe_tap = None

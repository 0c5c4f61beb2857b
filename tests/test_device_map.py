"""Models split with device_map: the placement rule, per-layer devices, scores vs ground truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from raypipe.engine.capture import Capturer
from raypipe.engine.hooks import layer_devices, model_device, module_device
from raypipe.engine.models import ModelSpec, load_model, pick_device_map
from raypipe.engine.projector import Projector, _gather
from raypipe.errors import InputError

CPU = torch.device("cpu")
LENGTHS = (5, 17, 1, 9)
# The last of the 4 layers is left out: HF's hidden_states[-1] has the final norm applied.
LAYERS = (0, 2, 2, 1)


def _seqs() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 128, (n,), generator=gen).tolist() for n in LENGTHS]


def _vectors() -> list[tuple[int, list[float]]]:
    gen = torch.Generator().manual_seed(2)
    return [(layer, torch.randn(64, generator=gen).tolist()) for layer in LAYERS]


def _spec(tmp_path, **kw) -> ModelSpec:
    return ModelSpec(str(kw.pop("model")), tmp_path / "cache", dtype="float32", device="cpu", **kw)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """A plain single-device load: the ground truth every placement must reproduce."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    truth = []
    for seq in _seqs():
        with torch.no_grad():
            hs = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
        truth.append([hs[layer + 1][0].float() for layer in range(len(hs) - 1)])  # (T, D) each
    return truth


def _check_against(reference, results, vectors) -> None:
    for hs, res in zip(reference, results):
        for row, (layer, vec) in enumerate(vectors):
            v = torch.as_tensor(vec)
            h = hs[layer]  # (T, D)
            np.testing.assert_allclose(
                res.scores[row], (h @ (v / v.norm())).numpy(), rtol=1e-4, atol=1e-5
            )
            np.testing.assert_allclose(res.norms[row], h.norm(dim=-1).numpy(), rtol=1e-4, atol=1e-5)


# ---- the placement rule ---------------------------------------------------------------------


def test_rule_keeps_one_device_unless_several_gpus(tmp_path):
    spec = ModelSpec("m", tmp_path)
    assert pick_device_map(spec, "cpu", 0) == {"": "cpu"}
    assert pick_device_map(spec, "cuda", 1) == {"": "cuda"}
    assert pick_device_map(spec, "cuda", 2) == "auto"
    # A pinned GPU stays pinned even when others are visible.
    assert pick_device_map(spec, "cuda:1", 4) == {"": "cuda:1"}
    for strategy in ("auto", "balanced", "sequential"):
        explicit = ModelSpec("m", tmp_path, device_map=strategy)
        assert pick_device_map(explicit, "cpu", 0) == strategy
        assert pick_device_map(explicit, "cuda", 2) == strategy


class _Loaded(Exception):
    """Stops load_model right after it chose from_pretrained's arguments."""


@pytest.fixture
def spy_load(monkeypatch):
    seen: dict = {}

    def fake(path, **kwargs):
        seen.update(kwargs)
        raise _Loaded

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    return seen


@pytest.mark.parametrize(
    "device, gpus, kwargs, expected",
    [
        ("cpu", 0, {}, {"": "cpu"}),
        ("cuda", 1, {}, {"": "cuda"}),
        ("cuda", 2, {}, "auto"),  # a Ray actor given 2 GPUs and no --tp
        ("cuda", 2, {"tp_plan": "auto"}, None),  # TP shards instead: no device_map
        ("cuda", 2, {"device_map": {"": "cuda:0"}}, {"": "cuda:0"}),  # the caller's wins
    ],
)
def test_load_model_passes_the_rule(
    tmp_path, tiny_model_dir, spy_load, monkeypatch, device, gpus, kwargs, expected
):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    spec = ModelSpec(str(tiny_model_dir), tmp_path, dtype="float32", device=device)
    with pytest.raises(_Loaded):
        load_model(spec, **kwargs)
    assert spy_load.get("device_map") == expected


@pytest.mark.parametrize(
    "bad",
    ["gpu", "", "cuda:0", "Auto", {"": "cpu"}, 2],
)
def test_invalid_device_map(tmp_path, bad):
    with pytest.raises(InputError) as err:
        ModelSpec("m", tmp_path, device_map=bad)
    assert err.value.field == "device_map"


def test_strategy_with_pinned_gpu_is_refused(tmp_path):
    with pytest.raises(InputError, match="does not combine"):
        ModelSpec("m", tmp_path, device="cuda:1", device_map="auto")
    assert ModelSpec("m", tmp_path, device="cuda", device_map="balanced").device_map == "balanced"


# ---- real loads on CPU ----------------------------------------------------------------------


def test_explicit_auto_projects_like_default(tmp_path, tiny_model_dir, reference):
    seqs, vectors = _seqs(), _vectors()
    default, _ = load_model(_spec(tmp_path, model=tiny_model_dir))
    auto, _ = load_model(_spec(tmp_path, model=tiny_model_dir, device_map="auto"))
    assert model_device(auto) == CPU
    assert set(layer_devices(auto, [0, 1, 2, 3]).values()) == {CPU}
    a = Projector(default, vectors).project(seqs)
    b = Projector(auto, vectors).project(seqs)
    for x, y in zip(a, b):
        np.testing.assert_allclose(x.scores, y.scores, rtol=0, atol=1e-5)
        np.testing.assert_allclose(x.norms, y.norms, rtol=0, atol=1e-5)
    _check_against(reference, b, vectors)


def test_explicit_dict_dispatch(tmp_path, tiny_model_dir, reference):
    # Every module named: accelerate dispatches and hooks each entry.
    names = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head"]
    device_map = {n: "cpu" for n in names + [f"model.layers.{i}" for i in range(4)]}
    model, _ = load_model(_spec(tmp_path, model=tiny_model_dir), device_map=device_map)
    assert layer_devices(model, [0, 1, 2, 3]) == {i: CPU for i in range(4)}
    assert layer_devices(model, [1], "attn_contribution") == {1: CPU}
    vectors = _vectors()
    _check_against(reference, Projector(model, vectors).project(_seqs()), vectors)


@pytest.fixture(scope="module")
def offloaded(tmp_path_factory, tiny_model_dir):
    """The embeddings and layers 1 and 3 offloaded to disk: their weights sit on "meta" and
    run on the CPU."""
    tmp = tmp_path_factory.mktemp("offload")
    device_map = {
        "model.embed_tokens": "disk",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "cpu",
        "model.layers.3": "disk",
        "model.norm": "cpu",
        "lm_head": "cpu",
    }
    model, _ = load_model(
        _spec(tmp, model=tiny_model_dir), device_map=device_map, offload_folder=str(tmp / "off")
    )
    return model


def test_offloaded_layers_report_their_execution_device(offloaded):
    blocks = offloaded.model.layers
    assert next(blocks[1].parameters()).device.type == "meta"  # the weights cannot tell
    assert offloaded.model.embed_tokens.weight.device.type == "meta"
    assert layer_devices(offloaded, [0, 1, 2, 3]) == {i: CPU for i in range(4)}
    assert layer_devices(offloaded, [3], "attn_contribution") == {3: CPU}
    assert model_device(offloaded) == CPU


@pytest.mark.parametrize("massive_dims", [None, [3, 10]])
def test_offloaded_projection_matches_ground_truth(offloaded, reference, massive_dims):
    vectors = _vectors()
    proj = Projector(offloaded, vectors, massive_dims=massive_dims)
    assert all(b.device == CPU for b in proj.bank.values())
    res = proj.project(_seqs())
    _check_against(reference, res, vectors)
    if massive_dims:
        for hs, r in zip(reference, res):
            for row, (layer, vec) in enumerate(vectors):
                h = hs[layer].clone()
                h[:, massive_dims] = 0
                v = torch.as_tensor(vec)
                np.testing.assert_allclose(
                    r.cleaned_scores[row], (h @ (v / v.norm())).numpy(), rtol=1e-4, atol=1e-5
                )


def test_offloaded_capture_matches_ground_truth(offloaded, reference):
    got = Capturer(offloaded, [0, 1, 2]).capture(_seqs())
    for hs, acts in zip(reference, got):
        for layer in (0, 1, 2):
            torch.testing.assert_close(acts[layer], hs[layer], rtol=1e-4, atol=1e-5)


# ---- per-layer device bookkeeping -----------------------------------------------------------


class _Hook:
    def __init__(self, device):
        self.execution_device = device


class _Chain:
    """accelerate's SequentialHook: several hooks on one module."""

    def __init__(self, *hooks):
        self.hooks = hooks


def test_module_device_prefers_the_execution_device():
    lin = nn.Linear(2, 2)
    assert module_device(lin) == CPU
    meta = nn.Linear(2, 2, device="meta")
    assert module_device(meta) == torch.device("meta")  # nothing better to go by
    meta._hf_hook = _Hook("cpu")
    assert module_device(meta) == CPU
    meta._hf_hook = _Chain(object(), _Hook(torch.device("cpu")))
    assert module_device(meta) == CPU
    outer = nn.Sequential(nn.Linear(2, 2, device="meta"))  # hooked below, not on itself
    outer[0]._hf_hook = _Hook("cpu")
    assert module_device(outer) == CPU
    assert module_device(nn.ReLU()) == CPU


def test_layer_devices_follow_each_block(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    # Stand-ins for a split: only the mapping is checked, no forward runs.
    model.model.layers[2]._hf_hook = _Hook("meta")
    model.model.layers[3].self_attn.o_proj._hf_hook = _Hook("meta")
    assert layer_devices(model, [0, 2, 3]) == {0: CPU, 2: torch.device("meta"), 3: CPU}
    assert layer_devices(model, [2, 3], "attn_contribution") == {
        2: CPU,
        3: torch.device("meta"),
    }


def test_bank_follows_a_hidden_state_found_elsewhere(tiny_model_dir, reference):
    # A layer recorded on the wrong device (a hand-made map) is corrected by the first hidden
    # state that arrives, and still scores right. "meta" stands in for the other device; it
    # holds no data, so the vectors themselves stay where they are.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    vectors = _vectors()
    proj = Projector(model, vectors, massive_dims=[3, 10])
    proj.layer_device[2] = torch.device("meta")
    res = proj.project(_seqs())
    assert proj.layer_device[2] == CPU and proj.bank[2].device == CPU
    assert proj.dims[2].device == CPU
    _check_against(reference, res, vectors)


def test_gather_leaves_same_device_tensors_alone():
    # The single-device path must not add a copy (or a sync) per layer.
    a, b = torch.ones(2), torch.zeros(2)
    out = _gather((a, b), CPU)
    assert out[0] is a and out[1] is b

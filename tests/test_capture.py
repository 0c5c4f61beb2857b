"""Raw capture: tensors vs output_hidden_states, the .pt round trip, re-projection vs Projector."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from raypipe.engine.batching import plan_batches
from raypipe.engine.capture import Capturer
from raypipe.engine.hooks import pad_right
from raypipe.engine.projector import Projector
from raypipe.errors import InputError
from raypipe.fromacts import SavedActivationsStage, score_capture
from raypipe.pipeline.stages import ProjectionSink, write_projections
from raypipe.store.captures import build_capture, read_capture, write_capture
from raypipe.store.outputs import VectorInfo
from raypipe.store.paths import ExperimentPaths
from raypipe.store.vectors import VectorSpec, load_vectors, parse_layers, resolve_vectors
from tests.conftest import PROMPTS, TRAITS
from tests.tiny import saved_vectors, tiny_llama, tiny_tokenizer

LENGTHS = (5, 17, 1, 30, 9, 12)
DTYPES = [torch.float32, torch.bfloat16]


def _seqs(seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=gen).tolist() for n in LENGTHS]


def _model(dtype):
    return tiny_llama().to(dtype)


def _specs(layers=(0, 2, 2, 3), seed=2, size=64) -> list[VectorSpec]:
    gen = torch.Generator().manual_seed(seed)
    traits = ["behavior/alpha", "tone/beta", "behavior/alpha", "tone/beta"]
    pairs = [(layer, torch.randn(size, generator=gen).tolist()) for layer in layers]
    return [replace(v, baseline=0.5 * i) for i, v in enumerate(saved_vectors(pairs, traits=traits))]


def _record(seq, acts, component, end=None):
    end = end if end is not None else max(1, len(seq) // 2)
    return build_capture(
        prompt_text="p",
        response_text="r",
        tokens=[f"t{i}" for i in seq],
        token_ids=seq,
        prompt_end=end,
        activations=acts,
        component=component,
    )


def close(got, want):
    """Equal up to float32 rounding of the score matmul (a few ulp)."""
    np.testing.assert_allclose(np.float32(got), want, rtol=1e-6, atol=1e-7)


def _same(a, b):
    """Projection records equal: every non-float field exactly, floats up to a few ulp."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, list) and a and all(isinstance(x, float) for x in a + b):
        close(a, np.float32(b))
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b and type(a) is type(b)


def _owns_storage(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


# ---------------------------------------------------------------- (a) Capturer vs ground truth


@pytest.mark.parametrize("dtype", DTYPES)
def test_capture_matches_hidden_states(dtype):
    model, seqs, layers = _model(dtype), _seqs(), [0, 2]
    capturer = Capturer(model, layers, "residual", max_batch_tokens=64)
    got = capturer.capture(seqs)
    # The same padded batches through a plain HF forward: bit-identical hidden states.
    for batch in plan_batches([len(s) for s in seqs], 64, overhead_tokens=capturer.overhead):
        ids, mask = pad_right([seqs[i] for i in batch], 0, "cpu")
        with torch.no_grad():
            hs = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states
        for row, i in enumerate(batch):
            assert set(got[i]) == set(layers)  # only the requested layers
            for layer in layers:
                t = got[i][layer]
                assert t.dtype == dtype and t.device.type == "cpu"
                assert t.shape == (len(seqs[i]), 64)  # real tokens only
                assert _owns_storage(t)  # not a view of the batch
                assert torch.equal(t, hs[layer + 1][row, : len(seqs[i])])
    # And each against the sequence run alone (padding changes nothing but rounding).
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for seq, acts in zip(seqs, got):
        with torch.no_grad():
            hs = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
        for layer in layers:
            torch.testing.assert_close(acts[layer], hs[layer + 1][0], rtol=tol, atol=tol)


def test_capture_rejects_bad_arguments():
    model = _model(torch.float32)
    with pytest.raises(ValueError, match="outside"):
        Capturer(model, [4])
    with pytest.raises(ValueError, match="component"):
        Capturer(model, [0], "mlp")
    with pytest.raises(ValueError, match="empty"):
        Capturer(model, [0]).capture([[5], []])


# ---------------------------------------------------------------- (b) the .pt format


def test_round_trip_and_bad_files(tmp_path):
    model, seqs = _model(torch.bfloat16), _seqs()
    acts = Capturer(model, [1, 3], "attn_contribution").capture(seqs)
    rec = _record(seqs[1], acts[1], "attn_contribution", end=6)
    for seg, n in (("prompt", 6), ("response", 11)):
        for t in rec[seg]["activations"].values():
            assert t["attn_contribution"].shape == (n, 64) and _owns_storage(t["attn_contribution"])
    path = write_capture(tmp_path / "raw" / "1.pt", rec)
    back = read_capture(path)
    assert torch.load(path, weights_only=True).keys() == {"prompt", "response"}
    for seg in ("prompt", "response"):
        assert back[seg]["text"] == rec[seg]["text"]
        assert back[seg]["tokens"] == rec[seg]["tokens"]
        assert back[seg]["token_ids"] == rec[seg]["token_ids"]
        assert sorted(back[seg]["activations"]) == [1, 3]
        for layer in (1, 3):
            t = back[seg]["activations"][layer]["attn_contribution"]
            assert t.dtype == torch.bfloat16
            assert torch.equal(t, rec[seg]["activations"][layer]["attn_contribution"])
    assert torch.equal(back["prompt"]["activations"][3]["attn_contribution"], acts[1][3][:6])
    # Slices of one big tensor must not drag its whole storage into the file.
    big = torch.randn(1000, 64)  # 256 kB
    small = write_capture(tmp_path / "small.pt", _record(seqs[1], {0: big[10:27]}, "residual"))
    assert small.stat().st_size < 17 * 64 * 4 + 4000

    data = path.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"truncated\.pt: capture: .*truncated"):
        read_capture(bad)
    with pytest.raises(InputError, match="file not found"):
        read_capture(tmp_path / "nope.pt")

    def broken(mutate, name):
        r = _record(seqs[1], acts[1], "attn_contribution", end=6)
        mutate(r)
        p = tmp_path / f"{name}.pt"
        torch.save(r, p)
        return p

    cases = [
        (lambda r: r.pop("response"), "response: missing"),
        (lambda r: r["prompt"].pop("token_ids"), "prompt.token_ids"),
        (lambda r: r["prompt"]["tokens"].pop(), "prompt.tokens: has 5 strings for 6"),
        (
            lambda r: r["response"]["activations"][1].update(attn_contribution=torch.zeros(3, 64)),
            "response.activations.1.attn_contribution: has 3 rows but the response has 11",
        ),
        (lambda r: r["response"]["activations"].pop(3), "layers or components differ"),
        (
            lambda r: r["prompt"]["activations"][1].update(attn_contribution=torch.zeros(6, 8)),
            "hidden size 64 differs from the prompt's 8",
        ),
        (lambda r: r["prompt"].update(activations={"x": {}}), "not a layer number"),
    ]
    for i, (mutate, message) in enumerate(cases):
        p = broken(mutate, f"bad{i}")
        with pytest.raises(InputError, match=f"bad{i}.pt") as err:
            read_capture(p)
        assert message in str(err.value)
    # Pickled objects are refused by weights_only and become the same one-line error.
    p = tmp_path / "pickled.pt"
    torch.save({"prompt": VectorInfo("a/b", "probe", "response[:]", 0, "x", 0.0)}, p)
    with pytest.raises(InputError, match="pickled.pt: capture: not a loadable"):
        read_capture(p)


# ---------------------------------------------------------------- (c) re-projection vs Projector


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("component", ["residual", "attn_contribution"])
def test_saved_activations_score_as_the_projector_does(dtype, component):
    model, seqs, specs, dims = _model(dtype), _seqs(), _specs(), [3, 17]
    proj = Projector(model, load_vectors(specs, None), component, massive_dims=dims)
    expected = proj.project(seqs)
    acts = Capturer(model, sorted({v.layer for v in specs}), component).capture(seqs)
    for seq, acts_i, exp in zip(seqs, acts, expected):
        end = max(1, len(seq) // 2)
        got = score_capture(_record(seq, acts_i, component, end), specs, component, dims)
        assert got.scores.shape == exp.scores.shape == (len(specs), len(seq))
        # Same hidden states and the same fp32 formulas. Only the BLAS kernel may differ: MKL
        # picks gemv for a one-column matmul and rounds the tail rows of its M differently,
        # so a score can be 1-2 ulp off; norms are exact.
        for i in range(len(specs)):
            close(got.scores[i], exp.scores[i])
            close(got.cleaned_scores[i], exp.cleaned_scores[i])
        np.testing.assert_array_equal(got.norms, exp.norms)
        np.testing.assert_array_equal(got.cleaned_norms, exp.cleaned_norms)


# ------------------------------------------------------------ (d) the saved stage vs stream-through


def _load(path):
    rec = json.loads(path.read_text())
    rec["metadata"].pop("projection_date")
    return rec


def test_from_activations_matches_stream_through(tiny_root, tiny_model_dir):
    paths = ExperimentPaths(tiny_root, "tiny")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    specs, _ = resolve_vectors(
        paths, TRAITS, "base", "residual", parse_layers("best,0,3", 4), 4, 64
    )
    dims = (5, 2)
    tok = tiny_tokenizer()
    gen = torch.Generator().manual_seed(3)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    seqs = [p + torch.randint(3, 128, (4,), generator=gen).tolist() for p in prompts]
    ids = [str(i) for i in range(len(seqs))]
    prompt_set = "tests/small"

    # Stream-through: Projector scores written by the pipeline's own writer, variant "stream".
    res = Projector(model, load_vectors(specs, None), massive_dims=list(dims)).project(seqs)
    batch = pd.DataFrame(
        {
            "prompt_set": [prompt_set] * len(seqs),
            "prompt_id": ids,
            "prompt_end": [len(p) for p in prompts],
            "generated": [False] * len(seqs),
            "token_ids": seqs,
            "error": [None] * len(seqs),
            "scores": [r.scores.ravel() for r in res],
            "norms": [r.norms.ravel() for r in res],
            "cleaned_scores": [r.cleaned_scores.ravel() for r in res],
            "cleaned_norms": [r.cleaned_norms.ravel() for r in res],
        }
    )
    infos = tuple(
        VectorInfo(v.trait, v.method, v.position, v.layer, v.selection_source, v.baseline)
        for v in specs
    )
    sink = ProjectionSink(paths, "stream", infos, "residual", True, False, dims)
    assert set(write_projections(batch, sink)["status"]) == {"done"}

    # Capture then re-project, variant "acts"; the last prompt has no capture.
    acts = Capturer(model, sorted({v.layer for v in specs}), "residual").capture(seqs)
    for pid, seq, p, a in zip(ids[:-1], seqs, prompts, acts):
        rec = _record(seq, a, "residual", len(p))
        write_capture(paths.raw_file("acts", "residual", prompt_set, pid), rec)

    def from_activations(force: bool) -> pd.DataFrame:
        """The saved stage and the writer, as backend "saved" chains them (the plan's rows:
        every prompt to project, as --force or missing files make them)."""
        stage = SavedActivationsStage(paths, "acts", "residual", specs, dims)
        rows = pd.DataFrame(
            {"prompt_set": [prompt_set] * len(ids), "prompt_id": ids, "project": [True] * len(ids)}
        )
        sink = ProjectionSink(paths, "acts", infos, "residual", True, force, dims)
        return write_projections(stage(rows), sink)

    out = from_activations(force=False)
    assert list(out["status"]) == ["done"] * (len(ids) - 1) + ["failed"]
    assert "no raw capture" in out["error"].iloc[-1]

    for trait in TRAITS:
        for pid in ids[:-1]:
            a = _load(paths.projection_file("stream", trait, prompt_set, pid))
            b = _load(paths.projection_file("acts", trait, prompt_set, pid))
            _same(a, b)

    # Existing files are kept (a file that holds every requested entry); --force rewrites them.
    f = paths.projection_file("acts", TRAITS[0], prompt_set, "0")
    f.write_text(f.read_text().replace('"projection_date": "', '"projection_date": "kept '))
    again = from_activations(force=False)
    assert list(again["status"][:-1]) == ["skipped"] * (len(ids) - 1)
    assert '"projection_date": "kept ' in f.read_text()
    forced = from_activations(force=True)
    assert list(forced["status"][:-1]) == ["done"] * (len(ids) - 1)
    assert '"projection_date": "kept ' not in f.read_text()


# ---------------------------------------------------------------- (e) layers that were not captured


def test_uncaptured_layer_or_component_is_an_input_error(tmp_path):
    model, seqs = _model(torch.float32), _seqs()
    acts = Capturer(model, [0, 1], "residual").capture(seqs[:1])
    path = write_capture(tmp_path / "7.pt", _record(seqs[0], acts[0], "residual"))
    rec = read_capture(path)
    with pytest.raises(InputError, match=r"7\.pt: .*layer 2 was not captured") as err:
        score_capture(rec, _specs(layers=(0, 2)), "residual", None, path)
    assert "captured layers: [0, 1]" in str(err.value)
    with pytest.raises(
        InputError, match=r"7\.pt: .*'attn_contribution' was not captured at layer 0"
    ):
        score_capture(rec, _specs(layers=(0,)), "attn_contribution", None, path)
    short = _specs(layers=(1,), size=32)
    with pytest.raises(InputError, match="hidden size 64 but the vectors have 32"):
        score_capture(rec, short, "residual", None, path)

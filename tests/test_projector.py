"""Hooked scores equal an independent reference: output_hidden_states of a plain forward."""

import numpy as np
import pytest
import torch

from raypipe.engine.hooks import cpp_compiler
from raypipe.engine.projector import Projector
from raypipe.store.scores import normalize_projections
from tests.tiny import tiny_llama


def _reference(model, seq, layer, vec, component):
    ids = torch.tensor([seq])
    if component == "residual":
        with torch.no_grad():
            hs = model(ids, output_hidden_states=True).hidden_states[layer + 1][0]
    else:
        store = {}
        h = model.model.layers[layer].self_attn.o_proj.register_forward_hook(
            lambda m, a, o: store.__setitem__("h", o[0])
        )
        with torch.no_grad():
            model(ids)
        h.remove()
        hs = store["h"]
    v = torch.as_tensor(vec, dtype=torch.float32)
    return (hs.float() @ (v / v.norm())).numpy(), hs.float().norm(dim=-1).numpy()


@pytest.fixture(scope="module")
def setup():
    model = tiny_llama()
    gen = torch.Generator().manual_seed(1)
    seqs = [
        torch.randint(3, 128, (n,), generator=gen).tolist() for n in (5, 17, 9, 30, 1, 12, 23, 7)
    ]
    vectors = [(layer, torch.randn(64, generator=gen).tolist()) for layer in (0, 2, 2, 1)]
    # The last layer is left out: HF's hidden_states[-1] has the final norm applied, while
    # raypipe's residual is always the raw block output.
    return model, seqs, vectors


@pytest.mark.parametrize("component", ["residual", "attn_contribution"])
def test_matches_hidden_states(setup, component):
    model, seqs, vectors = setup
    proj = Projector(model, vectors, component=component)
    out = proj.project(seqs)
    for seq, res in zip(seqs, out):
        assert res.scores.shape == (len(vectors), len(seq))
        for row, (layer, vec) in enumerate(vectors):
            ref, norms = _reference(model, seq, layer, vec, component)
            np.testing.assert_allclose(res.scores[row], ref, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(res.norms[row], norms, rtol=1e-4, atol=1e-5)


def test_batch_size_one_equals_eight(setup):
    model, seqs, vectors = setup
    batched = Projector(model, vectors).project(seqs)
    single = Projector(model, vectors, max_batch_tokens=1).project(seqs)
    for a, b in zip(batched, single):
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)


def test_early_stop_skips_upper_layers(setup):
    model, seqs, vectors = setup
    fired = []
    h = model.model.layers[2].register_forward_hook(lambda *a: fired.append(1))
    Projector(model, [(1, vectors[0][1])]).project(seqs[:2])
    h.remove()
    assert fired == []


def test_massive_dim_cleaning(setup):
    model, seqs, vectors = setup
    dims = [3, 10]
    res = Projector(model, vectors, massive_dims=dims).project(seqs[:1])[0]
    seq = seqs[0]
    ids = torch.tensor([seq])
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    for row, (layer, vec) in enumerate(vectors):
        h = hs[layer + 1][0].clone()
        h[:, dims] = 0
        v = torch.as_tensor(vec)
        np.testing.assert_allclose(
            res.cleaned_scores[row], (h @ (v / v.norm())).numpy(), rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            res.cleaned_norms[row], h.norm(dim=-1).numpy(), rtol=1e-4, atol=1e-5
        )


def test_normalize_modes():
    raw = np.array([1.0, -2.0, 3.0], dtype=np.float32)
    norms = np.array([2.0, 4.0, 0.0], dtype=np.float32)
    np.testing.assert_allclose(normalize_projections(raw, norms, "raw"), raw)
    np.testing.assert_allclose(normalize_projections(raw, norms, "normalized"), raw / 2.0)
    np.testing.assert_allclose(normalize_projections(raw, norms, "cosine", 0.0), [0.5, -0.5, 0.0])
    with pytest.raises(ValueError):
        normalize_projections(raw, norms, "bogus")


def test_right_padding_drops_the_mask_and_keeps_the_scores(setup):
    from raypipe.engine.hooks import decoder_stack, hooked_prefill, pad_right, right_padded

    model, _, _ = setup
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 128, (n,), generator=gen).tolist() for n in (3, 30, 11)]
    ids, mask = pad_right(seqs, 0, "cpu")  # mostly padding in two of three rows
    seen = []
    stack = decoder_stack(model)
    handle = stack.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True
    )
    try:
        got = hooked_prefill(model, ids, mask, [1, 2], "residual", lambda layer, h: h.clone())
        left = torch.flip(mask, dims=[1])  # left padding: the mask must stay
        hooked_prefill(model, torch.flip(ids, dims=[1]), left, [1], "residual", lambda *a: None)
    finally:
        handle.remove()
    assert seen[0] is None and seen[1] is left
    assert right_padded(mask) and not right_padded(left) and not right_padded(None)
    assert not right_padded(torch.tensor([[1, 0, 1]]))
    for row, seq in enumerate(seqs):
        with torch.no_grad():
            ref = model(torch.tensor([seq]), output_hidden_states=True).hidden_states
        for layer in (1, 2):
            torch.testing.assert_close(got[layer][row, : len(seq)], ref[layer + 1][0])


@pytest.mark.skipif(not cpp_compiler(), reason="torch.compile on the CPU needs a C++ compiler")
def test_compiled_prefill_matches_eager_and_leaves_the_blocks_eager(setup):
    from raypipe.engine.capture import Capturer
    from raypipe.engine.hooks import decoder_layers

    model, seqs, vectors = setup
    eager = Projector(model, vectors).project(seqs)
    compiled = Projector(model, vectors, compile=True).project(seqs)
    for a, b in zip(eager, compiled):
        np.testing.assert_allclose(b.scores, a.scores, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(b.norms, a.norms, rtol=1e-4, atol=1e-5)
    acts = Capturer(model, [1, 2], compile=True).capture(seqs[:3])
    ref = Capturer(model, [1, 2]).capture(seqs[:3])
    for a, b in zip(ref, acts):
        for layer in (1, 2):
            torch.testing.assert_close(b[layer], a[layer], rtol=1e-4, atol=1e-5)
    # Compiled once per model, and only inside the prefill: generation stays eager.
    assert len(model._raypipe_compiled_blocks) == len(decoder_layers(model))
    assert all("forward" not in vars(block) for block in decoder_layers(model))


def test_compiled_prefill_refuses_wrapped_blocks(setup):
    from raypipe.engine.hooks import decoder_layers
    from raypipe.errors import RaypipeError

    model, seqs, vectors = setup
    block = decoder_layers(model)[0]
    block.forward = block.forward  # what accelerate's hooks do to a dispatched block
    try:
        with pytest.raises(RaypipeError, match="compile_prefill: the decoder blocks are wrapped"):
            Projector(model, vectors, compile=True).project(seqs[:1])
    finally:
        del block.forward


def test_compiled_prefill_without_a_compiler_says_so(monkeypatch):
    from raypipe.engine import hooks
    from raypipe.errors import RaypipeError

    monkeypatch.setattr(hooks, "cpp_compiler", lambda: None)
    with pytest.raises(RaypipeError, match="needs a C\\+\\+ compiler"):
        Projector(tiny_llama(layers=2), [(0, [1.0] * 64)], compile=True).project([[3, 4, 5]])

"""vLLM backend vs the HF engine on the embedded model: same prompt ids, same greedy tokens, and
the scores of one-pass monitoring inside vLLM equal the HF projector's."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from raypipe.engine.generate import GenerationOptions, uses_chat_template
from raypipe.engine.models import ModelSpec
from raypipe.errors import InputError

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in-process: seconds
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("RAYPIPE_CACHE", "~/.cache/raypipe")).expanduser()
N_PROMPTS = 20
OPTS = GenerationOptions(max_new_tokens=32)


def _spec(**kwargs) -> ModelSpec:
    return ModelSpec("smollm2-135m-instruct", CACHE, dtype="float32", device="cpu", **kwargs)


@pytest.fixture(scope="module")
def items() -> list[tuple[str, str | None]]:
    from raypipe.store.prompts import load_prompt_set

    prompts = load_prompt_set(ROOT / "datasets", "starter_prompts/general")
    return [(p.text, p.system_prompt) for p in prompts.items[:N_PROMPTS]]


@pytest.fixture(scope="module")
def hf(items):
    from raypipe.engine.models import load_model
    from raypipe.engine.respond import Responder

    model, tok = load_model(_spec())
    responder = Responder(model, tok, OPTS, uses_chat_template(tok, None), context=8192)
    return model, tok, responder.respond(items)


# Layers of the embedded model's 30: the first, the middle and the last (before the final norm).
LAYERS = (0, 14, 29)


@pytest.fixture(scope="module")
def vectors() -> list[tuple[int, list[float]]]:
    import torch

    g = torch.Generator().manual_seed(0)
    return [(layer, torch.randn(576, generator=g).tolist()) for layer in LAYERS for _ in range(2)]


@pytest.fixture(scope="module")
def vllm_responder(vectors):
    """The engine `--backend vllm` runs: generation with raypipe's hooks in vLLM's model."""
    from raypipe.engine.vllm_backend import VLLMMonitor

    responder = VLLMMonitor(_spec(), OPTS, None, vectors, context=8192)
    yield responder
    responder.close()


def _top2_gap(model, ids: list[int]) -> tuple[list[int], float]:
    """HF fp32 top-2 next-token ids after `ids`, and their logit gap."""
    import torch

    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1].float()  # (V,)
    top = torch.topk(logits, 2)
    return top.indices.tolist(), float(top.values[0] - top.values[1])


def test_same_prompt_ids_and_greedy_tokens(items, hf, vllm_responder):
    model, tok, hf_out = hf
    vl_out = vllm_responder.respond(items)
    assert len(vl_out) == len(hf_out) == N_PROMPTS
    exact = 0
    for i, (h, v) in enumerate(zip(hf_out, vl_out)):
        assert h.error is None and v.error is None
        assert v.prompt_text == h.prompt_text
        assert v.prompt_end == h.prompt_end
        assert v.token_ids[: v.prompt_end] == h.token_ids[: h.prompt_end]
        assert v.tokens == tok.batch_decode([[t] for t in v.token_ids])
        assert 0 < len(v.token_ids) - v.prompt_end <= OPTS.max_new_tokens
        if v.token_ids == h.token_ids:
            exact += 1
            assert v.response_text == h.response_text
            continue
        # A divergence must be a near tie under HF's own fp32 logits, not a wrong prompt or EOS.
        k = next(
            (j for j, (a, b) in enumerate(zip(h.token_ids, v.token_ids)) if a != b),
            min(len(h.token_ids), len(v.token_ids)),
        )
        assert k >= h.prompt_end
        top, gap = _top2_gap(model, h.token_ids[:k])
        diverged = (h.token_ids[k : k + 1], v.token_ids[k : k + 1])
        print(
            f"prompt {i}: diverges at response token {k - h.prompt_end} "
            f"(hf {diverged[0]}, vllm {diverged[1]}; hf top-2 {top}, logit gap {gap:.4f})"
        )
        assert gap < 0.1, f"prompt {i}: HF prefers {top[0]} by {gap:.3f} logits"
    print(f"vLLM vs HF (fp32, greedy, {OPTS.max_new_tokens} new tokens): {exact}/{N_PROMPTS} exact")
    assert exact >= 0.8 * N_PROMPTS


def test_one_pass_scores_equal_hf_projector(items, hf, vllm_responder, vectors):
    """Eight prompts of different lengths in one generate call: every prompt and generated
    token's score equals HF's (the projector, and hidden_states[L+1] . v^ below the top)."""
    import numpy as np
    import torch

    from raypipe.engine.projector import Projector

    model, _, _ = hf
    out = vllm_responder.respond(items[:8])
    seqs = [r.token_ids for r in out]
    got = vllm_responder.take_scores(seqs)
    ref = Projector(model, vectors).project(seqs)
    assert len({r.prompt_end for r in out}) > 4
    worst = 0.0
    for res, g, r in zip(out, got, ref):
        assert g.scores.shape == r.scores.shape == (len(vectors), len(res.token_ids))
        for a, b in ((g.scores, r.scores), (g.norms, r.norms)):
            scale = np.abs(b).max(axis=1, keepdims=True)
            worst = max(worst, float((np.abs(a - b) / scale).max()))
        with torch.inference_mode():
            hs = model(torch.tensor([res.token_ids]), output_hidden_states=True).hidden_states
        for i, (layer, v) in enumerate(vectors):
            if layer < 29:
                v = torch.tensor(v)
                direct = (hs[layer + 1][0] @ (v / v.norm())).numpy()
                scale = np.abs(direct).max()
                worst = max(worst, float(np.abs(g.scores[i] - direct).max() / scale))
    print(f"one-pass vLLM vs HF scores, fp32: worst relative error {worst:.2e}")
    assert worst < 1e-4


def test_sampling_is_seeded(items, vllm_responder):
    from raypipe.engine.vllm_backend import VLLMGenerator

    sampled = dataclasses.replace(OPTS, temperature=1.0, top_p=0.95, max_new_tokens=16)
    eos = vllm_responder.generator.eos
    prompts = [vllm_responder.prepare(t, s)[1] for t, s in items[:4]]
    a = VLLMGenerator(vllm_responder.engine, sampled, eos).generate(prompts)
    b = VLLMGenerator(vllm_responder.engine, sampled, eos).generate(prompts)
    other = dataclasses.replace(sampled, seed=1)
    c = VLLMGenerator(vllm_responder.engine, other, eos).generate(prompts)
    assert a == b
    assert a != c


def test_too_long_prompt_is_reported_not_generated(vllm_responder):
    long_text = "word " * 9000
    out = vllm_responder.respond([(long_text, None), ("Say hi.", None)])
    assert out[0].error is not None and "--truncate" in out[0].error
    assert out[0].response_text == "" and out[1].error is None and out[1].response_text


def test_options_vllm_cannot_serve():
    from raypipe.engine.vllm_backend import VLLMResponder, check_spec

    with pytest.raises(InputError, match="load_in_4bit: bitsandbytes NF4"):
        check_spec(_spec(load_in_4bit=True))
    with pytest.raises(InputError, match="load_in_4bit: bitsandbytes NF4"):
        VLLMResponder(_spec(load_in_4bit=True), OPTS, None)
    with pytest.raises(InputError, match="adapter_config.json"):
        check_spec(_spec(lora=str(ROOT / "no-such-adapter")))


def _random_lora(model, folder: Path, r: int = 8, alpha: int = 16, scale: float = 0.02) -> Path:
    """Writes a PEFT-format adapter on q_proj/v_proj and merges the same update into `model`."""
    import json

    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, layer in enumerate(model.model.layers):
        for name in ("q_proj", "v_proj"):
            lin = getattr(layer.self_attn, name)
            a = torch.randn(r, lin.in_features, generator=g) / lin.in_features**0.5  # (r, D)
            b = torch.randn(lin.out_features, r, generator=g) * scale  # (O, r)
            prefix = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = a
            tensors[f"{prefix}.lora_B.weight"] = b
            with torch.no_grad():
                lin.weight += (alpha / r) * b @ a
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": ["q_proj", "v_proj"],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_lora_matches_merged_weights(items, hf, tmp_path):
    """A LoRA variant on vLLM generates what HF generates with the adapter merged in."""
    from raypipe.engine.models import load_model
    from raypipe.engine.respond import Responder
    from raypipe.engine.vllm_backend import VLLMResponder

    _, _, base_out = hf
    few = items[:8]
    model, tok = load_model(_spec())
    adapter = _random_lora(model, tmp_path / "adapter")
    merged = Responder(model, tok, OPTS, uses_chat_template(tok, None)).respond(few)
    responder = VLLMResponder(_spec(lora=str(adapter)), OPTS, None)
    try:
        lora_out = responder.respond(few)
    finally:
        responder.close()
    exact = sum(m.token_ids == v.token_ids for m, v in zip(merged, lora_out))
    changed = sum(b.token_ids != v.token_ids for b, v in zip(base_out, lora_out))
    print(f"vLLM LoRA vs HF merged: {exact}/{len(few)} exact; {changed} differ from the base model")
    assert changed >= 1
    assert exact >= 0.8 * len(few)

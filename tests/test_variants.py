"""Model variants on the embedded model: a LoRA adapter and 4-bit NF4, through `raypipe infer`.

Both compare against the plain fp32 run on the same token ids: the instruct responses are
copied into the other run's responses folder first, and existing responses are reused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from raypipe.cli import main
from tests.tiny import write_prompt_set, write_vectors
from tests.viz.real_tree import ALIAS, HIDDEN, N_LAYERS, base_model_dir, make_lora_adapter

pytestmark = pytest.mark.slow

EXPERIMENT = "e"
PROMPT_SET = "variants/three"
PROMPTS = [
    "What causes the seasons on Earth?",
    "Write a four-line poem about a lighthouse.",
    "How do I get a coffee stain out of a white shirt?",
]
TRAITS = ["behavior/alpha", "tone/beta"]
LAYER = 10


def _infer(root: Path, *extra: str) -> None:
    args = ["infer", "--root", str(root), "--experiment", EXPERIMENT, "--prompt-set", PROMPT_SET]
    args += ["--layers", str(LAYER), "--max-new-tokens", "8", "--quiet", "--dtype", "float32"]
    assert main([*args, *extra]) == 0


def _inference(root: Path, variant: str) -> Path:
    return root / "experiments" / EXPERIMENT / "inference" / variant


def _copy_responses(root: Path, src: str, dst: str) -> None:
    shutil.copytree(
        _inference(root, src) / "responses" / PROMPT_SET,
        _inference(root, dst) / "responses" / PROMPT_SET,
    )


def _responses(root: Path, variant: str) -> dict[str, dict]:
    folder = _inference(root, variant) / "responses" / PROMPT_SET
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def _scores(root: Path, variant: str) -> dict[tuple[str, str], np.ndarray]:
    """(trait, prompt id) -> scores of every token, prompt then response, at LAYER."""
    out = {}
    for trait in TRAITS:
        folder = _inference(root, variant) / "projections" / trait / PROMPT_SET
        for path in sorted(folder.glob("*.json")):
            entries = json.loads(path.read_text())["projections"]
            (entry,) = [e for e in entries if e["layer"] == LAYER]
            out[trait, path.stem] = np.array(entry["prompt"] + entry["response"], np.float64)
    return out


@pytest.fixture(scope="module")
def fp32_root(tmp_path_factory, ray_session) -> Path:
    """An experiment with `instruct` and `lora` variants, after the plain fp32 instruct run."""
    base_model_dir()  # skips when the embedded model is missing; converts it once otherwise
    root = tmp_path_factory.mktemp("variants")
    adapter = root / "adapters" / "lora"  # written by the LoRA test, which alone needs peft
    exp = root / "experiments" / EXPERIMENT
    exp.mkdir(parents=True)
    (exp / "config.json").write_text(
        json.dumps(
            {
                "defaults": {"extraction": "instruct", "application": "instruct"},
                "model_variants": {
                    "instruct": {"model": ALIAS},
                    "lora": {"model": ALIAS, "lora": str(adapter)},
                },
            }
        )
    )
    # Random vectors keep this fast; they belong to the extraction variant.
    write_vectors(exp, TRAITS, n_layers=N_LAYERS, hidden=HIDDEN, variant="instruct")
    write_prompt_set(root, PROMPT_SET, PROMPTS)
    _infer(root)
    assert len(_responses(root, "instruct")) == len(PROMPTS)
    return root


def test_lora_variant_changes_scores_on_the_same_tokens(fp32_root: Path) -> None:
    root = fp32_root
    make_lora_adapter(root / "adapters" / "lora")
    _copy_responses(root, "instruct", "lora")
    _infer(root, "--model-variant", "lora")

    base, lora = _responses(root, "instruct"), _responses(root, "lora")
    assert base.keys() == lora.keys()
    for pid in base:
        assert lora[pid]["token_ids"] == base[pid]["token_ids"], pid  # reused, not regenerated

    a, b = _scores(root, "instruct"), _scores(root, "lora")
    assert a.keys() == b.keys() and len(a) == len(TRAITS) * len(PROMPTS)
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert np.isfinite(b[key]).all(), key
        # The adapter is active: every prompt's scores move, well above fp32 noise.
        assert np.abs(b[key] - a[key]).max() > 1e-2 * np.abs(a[key]).max(), key

    # Ground truth: the LoRA model's own hidden states, projected on the unit vector.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model_dir(), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(root / "adapters" / "lora")).eval()
    vec_dir = root / "experiments" / EXPERIMENT / "extraction" / TRAITS[0] / "instruct"
    v = torch.load(vec_dir / f"vectors/response_all/residual/probe/layer{LAYER}.pt")
    pid = next(iter(base))
    ids = torch.tensor([base[pid]["token_ids"]])
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[LAYER + 1][0]  # (T, D)
    want = (hidden @ (v / v.norm())).numpy()
    np.testing.assert_allclose(b[TRAITS[0], pid], want, rtol=1e-3, atol=1e-3)


def test_load_in_4bit_tracks_fp32_scores(fp32_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (extra 'quant')")
    # A copy of the tree holds the 4-bit run, so the fp32 outputs stay as they are.
    root = tmp_path / "nf4"
    shutil.copytree(fp32_root / "experiments", root / "experiments")
    shutil.copytree(fp32_root / "datasets", root / "datasets")
    _infer(root, "--load-in-4bit", "--force")

    base, quant = _responses(fp32_root, "instruct"), _responses(root, "instruct")
    assert {k: r["token_ids"] for k, r in quant.items()} == {
        k: r["token_ids"] for k, r in base.items()
    }
    a, b = _scores(fp32_root, "instruct"), _scores(root, "instruct")
    assert a.keys() == b.keys()
    # Leave out token 0, the attention sink, whose huge score would make any correlation high.
    x = np.concatenate([a[k][1:] for k in sorted(a)])
    y = np.concatenate([b[k][1:] for k in sorted(a)])
    assert np.isfinite(y).all()
    assert not np.allclose(x, y)  # really quantized
    r = float(np.corrcoef(x, y)[0, 1])
    assert r > 0.9, f"Pearson r between NF4 and fp32 scores is {r:.3f}"

"""An experiment tree written by the real pipeline on the embedded model, for the browser tests.

`build_real_tree(root)` runs raypipe itself on SmolLM2-135M-Instruct (the embedded alias):
`extract` for three starter traits, `calibrate`, then `infer` for two variants, `instruct` and
`lora` (a small random LoRA adapter on q_proj/v_proj). The `lora` run reuses the instruct
responses, so both variants are scored on the same tokens, except for one prompt that the LoRA
model answers itself (`own_prompt`). The instruct projections carry massive-dim-cleaned scores.
It returns the same kind of summary as `fixture_tree.write_fixture_tree`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from raypipe.cli import main

REPO = Path(__file__).resolve().parents[2]
ALIAS = "smollm2-135m-instruct"
HIDDEN, N_LAYERS = 576, 30  # SmolLM2-135M
EXPERIMENT = "smollm2"
PROMPT_SET = "starter_prompts/general"
VARIANTS = ("instruct", "lora")
# In name order, as the dashboard lists them.
TRAITS = ("starter_traits/formality", "starter_traits/optimism", "starter_traits/refusal")
N_PROMPTS = 5
N_PAIRS = 16
MAX_NEW_TOKENS = 32
LORA_STD = 0.1  # lora_B scale: changes scores visibly, keeps greedy text mostly the same


def cache_dir() -> Path:
    """The converted-model cache the CLI uses by default."""
    return Path(os.environ.get("RAYPIPE_CACHE") or "~/.cache/raypipe").expanduser()


def base_model_dir() -> Path:
    """The embedded model as a local folder (converted once, about 20 s); skip if absent."""
    from raypipe.engine.models import resolve_model_path
    from raypipe.errors import RaypipeError

    try:
        return resolve_model_path(ALIAS, cache_dir())
    except RaypipeError as err:
        pytest.skip(f"embedded model unavailable: {err}")


def make_lora_adapter(folder: Path, std: float = LORA_STD, seed: int = 0) -> Path:
    """A PEFT LoRA adapter (r=4, q_proj and v_proj) for the embedded model, saved to `folder`.

    PEFT starts lora_B at zero, which leaves the model unchanged; small random values make the
    adapter change the outputs."""
    pytest.importorskip("peft", reason="peft is not installed (extra 'lora')")
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model_dir(), dtype=torch.float32)
    torch.manual_seed(seed)  # lora_A's default init
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    model.save_pretrained(folder)
    return folder


def _prompt_set(root: Path) -> list[str]:
    data = json.loads((REPO / "datasets/inference" / f"{PROMPT_SET}.json").read_text())
    data["prompts"] = data["prompts"][:N_PROMPTS]
    target = root / "datasets/inference" / f"{PROMPT_SET}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data))
    return [str(p["id"]) for p in data["prompts"]]


def _run(*args: str) -> None:
    code = main([*args, "--quiet"])
    assert code == 0, f"raypipe {' '.join(args)} exited with {code}"


def build_real_tree(root: Path) -> dict[str, Any]:
    """Run the pipeline into `root` (needs a Ray session) and describe what it wrote."""
    root = Path(root)
    ids = _prompt_set(root)
    calibration = root / "datasets/inference/neutral/calibration.json"
    calibration.parent.mkdir(parents=True)
    shutil.copy(REPO / "datasets/inference/neutral/calibration.json", calibration)
    for trait in TRAITS:
        # The first N_PAIRS of about 66 pairs per trait: real vectors, a quarter of the time.
        data = json.loads((REPO / "datasets/traits" / trait / "pairs.json").read_text())
        data["pairs"] = data["pairs"][:N_PAIRS]
        target = root / "datasets/traits" / trait / "pairs.json"
        target.parent.mkdir(parents=True)
        target.write_text(json.dumps(data))
    adapter = make_lora_adapter(root / "adapters" / "lora")
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
    common = ("--root", str(root), "--experiment", EXPERIMENT)
    _run("extract", *common, "--traits", ",".join(TRAITS))
    # Calibrate before the first infer, so that one run writes raw and cleaned scores.
    _run("calibrate", *common, "--max-tokens", "600")
    infer = ("infer", *common, "--prompt-set", PROMPT_SET, "--layers", "best,best+5")
    infer += ("--max-new-tokens", str(MAX_NEW_TOKENS))
    _run(*infer, "--remove-massive-dims")

    # The LoRA variant scores the instruct responses, and answers the last prompt itself.
    src = exp / "inference/instruct/responses" / PROMPT_SET
    dst = exp / "inference/lora/responses" / PROMPT_SET
    dst.mkdir(parents=True)
    for pid in ids[:-1]:
        shutil.copy(src / f"{pid}.json", dst / f"{pid}.json")
    _run(*infer, "--model-variant", "lora")

    return describe_real_tree(root)


def describe_real_tree(root: Path) -> dict[str, Any]:
    """The summary of a tree that `build_real_tree` wrote (also for a tree kept from a run)."""
    root = Path(root)
    exp = root / "experiments" / EXPERIMENT
    data = json.loads((root / "datasets/inference" / f"{PROMPT_SET}.json").read_text())
    ids = [str(p["id"]) for p in data["prompts"]]
    layers: dict[str, list[int]] = {}
    methods: dict[str, list[str]] = {}
    for trait in TRAITS:
        path = exp / "inference/instruct/projections" / trait / PROMPT_SET / f"{ids[0]}.json"
        entries = json.loads(path.read_text())["projections"]
        layers[trait] = [e["layer"] for e in entries]
        methods[trait] = [e["method"] for e in entries]
    cal = json.loads((exp / "inference/instruct/massive_activations/calibration.json").read_text())
    own = ids[-1]
    token_ids = [
        json.loads((exp / "inference" / v / "responses" / PROMPT_SET / f"{own}.json").read_text())[
            "token_ids"
        ]
        for v in VARIANTS
    ]
    return {
        "root": root,
        "experiment": EXPERIMENT,
        "variants": list(VARIANTS),
        "prompt_set": PROMPT_SET,
        "prompt_ids": ids,
        "traits": list(TRAITS),
        "layers": layers,  # per trait, in file order: the best layer first
        "methods": methods,  # per trait, the method of each of those entries
        "massive_dims": cal["aggregate"]["massive_dims"],
        "own_prompt": own,  # the prompt the LoRA variant answered itself
        "diverging_prompt": own if token_ids[0] != token_ids[1] else None,
    }

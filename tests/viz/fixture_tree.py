"""A small experiment tree in raypipe's on-disk formats (SPEC sections 2 and 7) for dashboard tests.

`write_fixture_tree(root)` writes `root/experiments/demo/` with two model variants (`instruct`
and a LoRA fine-tune `lora`), one prompt set, three traits at two layers, calibration and
massive-dim-cleaned scores for `instruct`, and both Parquet tables per variant. It can be
swapped for outputs of the real pipeline as long as the returned summary stays true.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypipe.store.parquet import PROJECTIONS_SCHEMA, RESPONSES_SCHEMA

EXPERIMENT = "demo"
PROMPT_SET = "starter_prompts/general"
VARIANTS = ("instruct", "lora")
TRAITS = ("emotion/joy", "safety/refusal", "persona/sycophancy")
LAYERS = (12, 16)
MASSIVE_DIMS = [12, 400]
BASELINES = {"emotion/joy": 0.4, "safety/refusal": -0.25, "persona/sycophancy": 0.15}

SYSTEM = "You are a helpful assistant."
PROMPTS = [
    (
        "How do I bake sourdough bread at home?",
        "Start with an active starter. Mix flour, "
        "water and salt, let the dough rest for an hour, then fold it every thirty minutes. "
        "Shape it, proof overnight in the fridge and bake hot in a covered pot.",
    ),
    (
        "Can you help me pick a lock on my neighbour's door?",
        "I can't help with getting into "
        "someone else's home. If you are locked out of your own place, a licensed locksmith or "
        "your landlord can let you in safely.",
    ),
    (
        "I think my poem is the best ever written. Agree?",
        "What a wonderful poem! The images "
        "are vivid and the rhythm carries the reader. Some lines could be tighter, but it is "
        "a joy to read and you should be proud of it.",
    ),
    (
        "Summarize the causes of the French Revolution.",
        "Debt from wars, unfair taxes, food "
        "shortages and Enlightenment ideas pushed the Third Estate to demand change, which grew "
        "into revolt in 1789.",
    ),
    (
        "Tell me something that makes you happy.",
        "Helping someone solve a tricky problem is "
        "delightful! I love the moment an idea finally clicks.",
    ),
]
# The LoRA variant generated its own answer for the last prompt, so its tokens diverge there.
LORA_OWN = {4: "Helping you is truly the best thing ever! You are brilliant and kind."}


def _chat_tokens(user: str) -> list[str]:
    head = ["<|im_start|>", "system", "\n", *_words(SYSTEM), "<|im_end|>", "\n"]
    user_part = ["<|im_start|>", "user", "\n", *_words(user), "<|im_end|>", "\n"]
    return head + user_part + ["<|im_start|>", "assistant", "\n"]


def _words(text: str) -> list[str]:
    # Roughly how BPE splits English: a word with its leading space, punctuation on its own.
    return re.findall(r" ?[\w']+| ?[^\w\s]+", text)


def _f32(values: np.ndarray) -> list[float]:
    # float32 values written as JSON floats, so JSON and Parquet hold identical numbers.
    return [float(v) for v in np.asarray(values, dtype=np.float32)]


def _scores(
    seed: int, n: int, level: float, layer: int, prompt_part: bool
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=np.float64)
    base = 0.3 if prompt_part else 1.0
    raw = level * base + 0.9 * np.sin(t / 4.0 + seed % 7) + 0.25 * rng.standard_normal(n)
    raw = raw * (1.0 + (layer - 12) / 10.0)
    norms = 40.0 + layer * 2.0 + 6.0 * rng.random(n)
    if prompt_part and n:
        norms[0] = 900.0  # the attention-sink token carries a massive activation
        raw[0] = 6.0
    return raw.astype(np.float32), norms.astype(np.float32)


def _trait_level(trait: str, prompt_index: int, variant: str) -> float:
    table = {
        "emotion/joy": [0.8, -0.4, 1.6, 0.1, 2.0],
        "safety/refusal": [-0.6, 2.2, -0.5, -0.3, -0.7],
        "persona/sycophancy": [0.1, -0.2, 1.9, 0.0, 1.2],
    }
    level = table[trait][prompt_index]
    if variant == "lora":
        level += 1.1 if trait == "persona/sycophancy" else 0.15
    return level


def _entry(
    variant: str, trait: str, layer: int, index: int, n_prompt: int, n_resp: int
) -> dict[str, Any]:
    seed = 1000 * index + 10 * TRAITS.index(trait) + layer + (500_000 if variant == "lora" else 0)
    level = _trait_level(trait, index, variant)
    p_raw, p_norm = _scores(seed, n_prompt, level, layer, prompt_part=True)
    r_raw, r_norm = _scores(seed + 1, n_resp, level, layer, prompt_part=False)
    if variant == "lora" and index not in LORA_OWN:
        # Same tokens as instruct: the prompt part is shared context, nearly the same scores.
        base = _entry("instruct", trait, layer, index, n_prompt, n_resp)
        p_raw = np.asarray(base["prompt"], np.float32) + np.float32(0.02)
        p_norm = np.asarray(base["token_norms"]["prompt"], np.float32)
    entry: dict[str, Any] = {
        "method": "probe",
        "layer": layer,
        "selection_source": "steering" if layer == LAYERS[0] else "layers_arg",
        "baseline": BASELINES[trait],
        "prompt": _f32(p_raw),
        "response": _f32(r_raw),
        "token_norms": {"prompt": _f32(p_norm), "response": _f32(r_norm)},
        "normalized_prompt": _f32(p_raw / p_norm.mean()) if n_prompt else [],
        "normalized_response": _f32(r_raw / r_norm.mean()) if n_resp else [],
    }
    if variant == "instruct":
        # Cleaning removes the massive dims' share: large on the sink token, small elsewhere.
        p_clean, r_clean = p_raw * 0.97, r_raw * 0.97 - 0.05
        p_cnorm, r_cnorm = np.sqrt(np.maximum(p_norm**2 - 30.0**2, 1.0)), r_norm * 0.99
        if n_prompt:
            p_clean[0], p_cnorm[0] = 0.4, 55.0
        entry["cleaned"] = {
            "dims": MASSIVE_DIMS,
            "prompt": _f32(p_clean),
            "response": _f32(r_clean),
            "token_norms": {"prompt": _f32(p_cnorm), "response": _f32(r_cnorm)},
        }
    return entry


def _response(variant: str, index: int) -> dict[str, Any]:
    user, answer = PROMPTS[index]
    if variant == "lora" and index in LORA_OWN:
        answer = LORA_OWN[index]
    prompt_tokens = _chat_tokens(user)
    response_tokens = _words(answer)
    tokens = prompt_tokens + response_tokens
    return {
        "prompt": "".join(prompt_tokens),
        "response": "".join(response_tokens),
        "system_prompt": SYSTEM,
        "tokens": tokens,
        "token_ids": [1000 + i for i in range(len(tokens))],
        "prompt_end": len(prompt_tokens),
        "inference_model": "Qwen/Qwen2.5-0.5B-Instruct"
        + (" + sycophant" if variant == "lora" else ""),
        "prompt_note": f"fixture prompt {index}",
        "capture_date": "2025-01-01T00:00:00+00:00",
        "tags": [],
    }


def _write(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


# The pipeline's own schemas: the fixture's tables can never drift from what raypipe writes.
PROJECTION_SCHEMA = PROJECTIONS_SCHEMA
RESPONSE_SCHEMA = RESPONSES_SCHEMA


def write_fixture_tree(root: Path) -> dict[str, Any]:
    """Write the tree under `root/experiments/demo` and return what a test needs to know."""
    exp = Path(root) / "experiments" / EXPERIMENT
    _write(
        exp / "config.json",
        {
            "defaults": {"extraction": "instruct", "application": "instruct"},
            "model_variants": {
                "instruct": {"model": "Qwen/Qwen2.5-0.5B-Instruct"},
                "lora": {"model": "Qwen/Qwen2.5-0.5B-Instruct", "lora": "adapters/sycophant"},
            },
        },
    )
    ids = [str(i) for i in range(len(PROMPTS))]
    for variant in VARIANTS:
        vdir = exp / "inference" / variant
        proj_rows: list[dict[str, Any]] = []
        resp_rows: list[dict[str, Any]] = []
        for index, pid in enumerate(ids):
            response = _response(variant, index)
            _write(vdir / "responses" / PROMPT_SET / f"{pid}.json", response)
            n_prompt = response["prompt_end"]
            n_resp = len(response["tokens"]) - n_prompt
            resp_rows.append(
                {
                    "prompt_set": PROMPT_SET,
                    "prompt_id": pid,
                    "prompt": response["prompt"],
                    "response": response["response"],
                    "system_prompt": SYSTEM,
                    "token_ids": response["token_ids"],
                    "tokens": response["tokens"],
                    "prompt_end": n_prompt,
                    "model": response["inference_model"],
                    "capture_date": response["capture_date"],
                }
            )
            for trait in TRAITS:
                entries = [_entry(variant, trait, L, index, n_prompt, n_resp) for L in LAYERS]
                meta = {
                    "prompt_id": pid,
                    "prompt_set": PROMPT_SET,
                    "n_prompt_tokens": n_prompt,
                    "n_response_tokens": n_resp,
                    "component": "residual",
                    "position": "response[:]",
                    "centered": False,
                    "score_mode": "raw+normalized",
                    "projection_date": "2025-01-01T00:00:00+00:00",
                }
                _write(
                    vdir / "projections" / trait / PROMPT_SET / f"{pid}.json",
                    {"metadata": meta, "projections": entries},
                )
                for e in entries:
                    proj_rows.append(
                        {
                            "prompt_set": PROMPT_SET,
                            "prompt_id": pid,
                            "trait": trait,
                            "method": e["method"],
                            "layer": e["layer"],
                            "component": "residual",
                            "position": "response[:]",
                            "selection_source": e["selection_source"],
                            "baseline": e["baseline"],
                            "centered": False,
                            "n_prompt_tokens": n_prompt,
                            "n_response_tokens": n_resp,
                            "prompt_scores": e["prompt"],
                            "response_scores": e["response"],
                            "prompt_norms": e["token_norms"]["prompt"],
                            "response_norms": e["token_norms"]["response"],
                            "normalized_prompt": e["normalized_prompt"],
                            "normalized_response": e["normalized_response"],
                        }
                    )
        for table, rows, schema in (
            ("projections", proj_rows, PROJECTION_SCHEMA),
            ("responses", resp_rows, RESPONSE_SCHEMA),
        ):
            path = vdir / "parquet" / table / f"{PROMPT_SET}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
        if variant == "instruct":
            _write(
                vdir / "massive_activations" / "calibration.json",
                {
                    "experiment": EXPERIMENT,
                    "model": "Qwen/Qwen2.5-0.5B-Instruct",
                    "model_variant": variant,
                    "source": "passive",
                    "tokens_seen": 5000,
                    "aggregate": {
                        "n_prompts": 5,
                        "top_dims_by_layer": {"12": MASSIVE_DIMS},
                        "dim_magnitude_by_layer": {},
                        "layer_norms": {},
                        "massive_dims": MASSIVE_DIMS,
                    },
                },
            )
    return {
        "root": Path(root),
        "experiment": EXPERIMENT,
        "variants": list(VARIANTS),
        "prompt_set": PROMPT_SET,
        "prompt_ids": ids,
        "traits": list(TRAITS),
        "layers": list(LAYERS),
        "massive_dims": MASSIVE_DIMS,
        "diverging_prompt": "4",
    }

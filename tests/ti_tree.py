"""An experiment tree laid out exactly as trait-interp lays one out, written from its formats.

What trait-interp writes, file by file (its `config/paths.yaml`, `utils/extract_vectors.py`,
`utils/steering_results.py`, `analysis/massive_activations.py`, `utils/process_activations.py`):
vectors extracted on the base variant, steering evaluated on the instruct variant, a
calibration without `massive_dims`, raw captures holding two components in `raw/residual/`,
and a response-only capture. No raypipe code writes any of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

EXPERIMENT = "ti"
PROMPT_SET = "probes/mixed"
N_LAYERS, HIDDEN = 4, 64
EXTRACTION, APPLICATION = "base", "instruct"

# trait -> {position folder: {method: with metadata.json?}}; residual unless said otherwise.
VECTORS = {
    "emotion/joy": {
        "response__5": {"probe": True, "mean_diff": True, "gradient": True},
        "response_all": {"probe": True},
    },
    "safety/refusal": {"prompt_-1": {"probe": False, "mean_diff": True}},
    "persona/sycophancy": {"response_all": {"probe": True, "mean_diff": True}},
}
POSITIONS = {
    "response__5": "response[:5]",
    "response_all": "response[:]",
    "prompt_-1": "prompt[-1]",
}
ATTN_VECTORS = ("emotion/joy", "response__5", "probe")  # one attn_contribution vector set

# What trait-interp's get_best_vector picks on this tree, and why (SPEC 5); for sycophancy,
# which has steering results under the extraction variant only, SPEC 2's fallback (trait-interp
# reads the application variant alone, and would skip the trait).
EXPECTED_BEST = {
    # instruct steering: mean_diff L2 +45 beats probe L1 +30, a method-less (= probe) run L2
    # +40, response[:] probe L3 +35; gradient L3 +80 is incoherent (40 < 77); the base
    # variant's results (probe L0 +99) are not the steered model's and are not read.
    "emotion/joy": ("mean_diff", "response[:5]", 2),
    # direction negative: probe L1 (60 -> 20, score +40) beats mean_diff L1 (+35); probe L2
    # raised the trait by +30, the wrong way (score -30); a file without metadata.json
    "safety/refusal": ("probe", "prompt[-1]", 1),
    # no steering under instruct: the extraction variant's results are read; no baseline
    # line there, so the baseline is 0: mean_diff L3 (trait 70) beats probe L2 (trait 66)
    "persona/sycophancy": ("mean_diff", "response[:]", 3),
}


def _json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))
    return path


def _jsonl(path: Path, lines: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def vector(trait: str, pos: str, method: str, layer: int, component: str = "residual"):
    seed = sum(map(ord, f"{trait}|{pos}|{method}|{component}")) * 10 + layer
    return torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed))


def _vector_set(exp: Path, trait: str, pos: str, method: str, meta: bool, component: str):
    folder = exp / "extraction" / trait / EXTRACTION / "vectors" / pos / component / method
    folder.mkdir(parents=True)
    layers = {}
    for layer in range(N_LAYERS):
        v = vector(trait, pos, method, layer, component)
        torch.save(v, folder / f"layer{layer}.pt")
        layers[str(layer)] = {"norm": float(v.norm()), "baseline": 0.1 * (layer + 1)}
        if method == "probe":
            layers[str(layer)]["train_acc"] = 0.9
    if meta:
        _json(
            folder / "metadata.json",
            {
                "model": "tiny/base",
                "trait": trait,
                "method": method,
                "component": component,
                "position": POSITIONS[pos],
                "layers": layers,
                "timestamp": "2025-11-02T10:00:00.000000",
            },
        )


def _header(trait: str, direction: str, variant: str) -> dict:
    return {
        "type": "header",
        "trait": trait,
        "direction": direction,
        "steering_model": f"tiny/{variant}",
        "steering_experiment": EXPERIMENT,
        "vector_source": {"model": "tiny/base", "experiment": EXPERIMENT, "trait": trait},
        "eval": {"model": "gpt-4.1-mini", "method": "logprob", "trait_judge": None},
        "prompts_file": f"datasets/traits/{trait}/steering.json",
        "n_questions": 10,
    }


def _baseline(trait_mean: float) -> dict:
    return {
        "type": "baseline",
        "result": {"trait_mean": trait_mean, "coherence_mean": 92.0, "n": 10},
        "eval": {"trait_judge": None},
        "timestamp": "2025-11-02T11:00:00",
    }


def _run(layer, method, trait_mean, coherence, position, weight=4.0) -> dict:
    vec = {"layer": layer, "component": "residual", "position": position, "weight": weight}
    if method is not None:  # older runs have no method: probe
        vec["method"] = method
    return {
        "result": {"trait_mean": trait_mean, "coherence_mean": coherence, "n": 10},
        "config": {"vectors": [vec]},
        "eval": {"trait_judge": None},
        "timestamp": "2025-11-02T12:00:00",
    }


def _steering(exp: Path, trait: str, variant: str, pos: str, lines: list[dict]) -> Path:
    path = exp / "steering" / trait / variant / pos / "steering" / "results.jsonl"
    return _jsonl(path, lines)


def write_steering(exp: Path) -> None:
    joy = "emotion/joy"
    _steering(
        exp,
        joy,
        APPLICATION,
        "response__5",
        [
            _header(joy, "positive", APPLICATION),
            _baseline(20.0),
            _run(1, "probe", 50.0, 85.0, "response[:5]"),
            _run(2, "mean_diff", 65.0, 90.0, "response[:5]"),
            _run(2, None, 60.0, 80.0, "response[:5]"),
            _run(3, "gradient", 100.0, 40.0, "response[:5]"),  # the incoherent decoy
            _run(0, "mean_diff", 30.0, 95.0, "response[:5]"),
        ],
    )
    _steering(
        exp,
        joy,
        APPLICATION,
        "response_all",
        [_header(joy, "positive", APPLICATION), _baseline(20.0)]
        + [_run(3, "probe", 55.0, 88.0, "response[:]")],
    )
    # Under the extraction variant: not the steered model's results, never read for joy.
    _steering(
        exp,
        joy,
        EXTRACTION,
        "response__5",
        [_header(joy, "positive", EXTRACTION), _baseline(0.0)]
        + [_run(0, "probe", 99.0, 99.0, "response[:5]")],
    )
    refusal = "safety/refusal"
    _steering(
        exp,
        refusal,
        APPLICATION,
        "prompt_-1",
        [
            _header(refusal, "negative", APPLICATION),
            _baseline(60.0),
            _run(1, "probe", 20.0, 88.0, "prompt[-1]"),
            _run(1, "mean_diff", 25.0, 90.0, "prompt[-1]"),
            _run(2, "probe", 90.0, 95.0, "prompt[-1]"),  # a high delta the wrong way
            _run(3, "probe", 5.0, 50.0, "prompt[-1]"),  # incoherent
        ],
    )
    syc = "persona/sycophancy"
    _steering(  # an older file: header, no baseline line
        exp,
        syc,
        EXTRACTION,
        "response_all",
        [
            _header(syc, "positive", EXTRACTION),
            _run(2, "probe", 66.0, 90.0, "response[:]"),
            _run(3, "mean_diff", 70.0, 85.0, "response[:]"),
        ],
    )


def write_calibration(exp: Path) -> Path:
    """analysis/massive_activations.py's calibration.json: no massive_dims, int keys (JSON
    strings), dim_magnitude_by_layer a list over layers per dim. Dim 7 ranks in the top 5 of
    three layers (the viewer's default rule makes it massive), dim 9 of two only."""
    top = {"0": [1, 2, 3, 4, 5], "1": [7, 9, 1, 2, 3], "2": [7, 9, 4, 5, 6], "3": [7, 1, 2, 3, 4]}
    dims = sorted({d for v in top.values() for d in v})
    return _json(
        exp / "inference" / APPLICATION / "massive_activations" / "calibration.json",
        {
            "experiment": EXPERIMENT,
            "model": "tiny/instruct",
            "model_variant": APPLICATION,
            "prompt_set": "calibration",
            "is_calibration": True,
            "aggregate": {
                "n_prompts": 50,
                "mean_alignment_by_layer": {},
                "top_dims_by_layer": top,
                "dim_magnitude_by_layer": {str(d): [1.0, 2.5, 3.0, 1.5] for d in dims},
                "layer_norms": {"0": 3.1, "1": 5.2, "2": 8.4, "3": 12.9},
            },
        },
    )


# prompt id -> (prompt token ids, response token ids); prompt 2's capture is response-only.
TOKENS = {"0": ([1, 5, 9, 4], [7, 7, 3]), "1": ([1, 6, 2], [8, 3, 3, 2, 9]), "2": ([1, 4], [5, 6])}
RESPONSE_ONLY = "2"


def activations(pid: str, segment: str, component: str) -> dict[int, torch.Tensor]:
    n = len(TOKENS[pid][0 if segment == "prompt" else 1])
    seed = sum(map(ord, f"{pid}|{segment}|{component}"))
    g = torch.Generator().manual_seed(seed)
    return {layer: torch.randn(n, HIDDEN, generator=g).bfloat16() for layer in range(N_LAYERS)}


def write_inference(exp: Path) -> None:
    """Responses (trait-interp's response schema) and raw captures, with both components in
    `raw/residual/` as capture_raw_activations saves them (`attention` keys and all)."""
    inf = exp / "inference" / APPLICATION
    for pid, (p_ids, r_ids) in TOKENS.items():
        ids = p_ids + r_ids
        _json(
            inf / "responses" / PROMPT_SET / f"{pid}.json",
            {
                "prompt": f"prompt {pid}",
                "response": f"response {pid}",
                "system_prompt": None,
                "tokens": [f"t{i}" for i in ids],
                "token_ids": ids,
                "prompt_end": len(p_ids),
                "inference_model": "tiny/instruct",
                "prompt_note": None,
                "capture_date": "2025-11-03T09:00:00",
                "tags": [],
            },
        )
        data = {}
        for seg, seg_ids in (("prompt", p_ids), ("response", r_ids)):
            comps = {c: activations(pid, seg, c) for c in ("residual", "attn_contribution")}
            data[seg] = {
                "text": f"{seg} {pid}",
                "tokens": [f"t{i}" for i in seg_ids],
                "token_ids": seg_ids,
                "activations": {
                    layer: {c: comps[c][layer] for c in comps} for layer in range(N_LAYERS)
                },
                "attention": {} if seg == "prompt" else [],
            }
        if pid == RESPONSE_ONLY:  # _save_pt_data(..., response_only=True)
            data["prompt"]["activations"] = {}
        path = inf / "raw" / "residual" / PROMPT_SET / f"{pid}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, path)


def write_tree(root: Path, model_dir: Path) -> Path:
    exp = root / "experiments" / EXPERIMENT
    _json(
        exp / "config.json",
        {
            "defaults": {"extraction": EXTRACTION, "application": APPLICATION},
            "model_variants": {
                EXTRACTION: {"model": str(model_dir)},
                APPLICATION: {"model": str(model_dir)},
            },
        },
    )
    for trait, by_pos in VECTORS.items():
        for pos, methods in by_pos.items():
            for method, meta in methods.items():
                _vector_set(exp, trait, pos, method, meta, "residual")
    trait, pos, method = ATTN_VECTORS
    _vector_set(exp, trait, pos, method, True, "attn_contribution")
    write_steering(exp)
    write_calibration(exp)
    write_inference(exp)
    _json(
        root / "datasets" / "inference" / f"{PROMPT_SET}.json",
        {
            "name": "mixed",
            "description": "three probes",
            "prompts": [{"id": int(pid), "text": f"prompt {pid}", "note": ""} for pid in TOKENS],
        },
    )
    return exp

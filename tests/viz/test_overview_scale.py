"""The overview on a 10,000-prompt Parquet table answers correctly without per-prompt JSON."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypipe.viz.server import make_server
from tests.viz.fixture_tree import PROJECTION_SCHEMA, RESPONSE_SCHEMA
from tests.viz.viz_http import get_json

N_PROMPTS = 10_000
N_TOKENS = 40
TRAITS = ["emotion/joy", "safety/refusal", "persona/sycophancy"]
LAYERS = [12, 16]
PS = "big/synthetic"


def _lists(values: np.ndarray) -> pa.ListArray:
    """(rows, tokens) float32 -> list<float32>, built from offsets (fast for 60k rows)."""
    rows, width = values.shape
    offsets = pa.array(np.arange(rows + 1, dtype=np.int32) * width)
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1), pa.float32()))


def _write_big_tree(root: Path) -> dict:
    rng = np.random.default_rng(7)
    vdir = root / "experiments" / "big" / "inference" / "instruct"
    (vdir.parent.parent / "config.json").parent.mkdir(parents=True, exist_ok=True)
    (vdir.parent.parent / "config.json").write_text(
        json.dumps({"model_variants": {"instruct": {"model": "m"}}})
    )
    ids = np.array([str(i) for i in range(N_PROMPTS)], dtype=object)
    n_rows = N_PROMPTS * len(TRAITS) * len(LAYERS)
    trait_col = np.repeat(np.array(TRAITS, dtype=object), N_PROMPTS * len(LAYERS))
    layer_col = np.tile(np.repeat(np.array(LAYERS, dtype=np.int32), N_PROMPTS), len(TRAITS))
    pid_col = np.tile(ids, len(TRAITS) * len(LAYERS))
    # Each prompt gets its own level so the means spread out; noise keeps them distinct.
    level = rng.normal(0.0, 1.0, n_rows).astype(np.float32)
    scores = (level[:, None] + rng.normal(0, 0.5, (n_rows, N_TOKENS))).astype(np.float32)
    norms = rng.uniform(20, 60, (n_rows, N_TOKENS)).astype(np.float32)
    short = np.zeros((n_rows, 3), np.float32)
    baseline = np.where(trait_col == "emotion/joy", 0.5, -0.2)
    table = pa.table(
        {
            "prompt_set": pa.array([PS] * n_rows),
            "prompt_id": pa.array(pid_col, pa.string()),
            "trait": pa.array(trait_col, pa.string()),
            "method": pa.array(["probe"] * n_rows),
            "layer": pa.array(layer_col, pa.int32()),
            "component": pa.array(["residual"] * n_rows),
            "position": pa.array(["response[:]"] * n_rows),
            "selection_source": pa.array(["steering"] * n_rows),
            "baseline": pa.array(baseline, pa.float64()),
            "centered": pa.array(np.zeros(n_rows, bool)),
            "n_prompt_tokens": pa.array(np.full(n_rows, 3, np.int32)),
            "n_response_tokens": pa.array(np.full(n_rows, N_TOKENS, np.int32)),
            "prompt_scores": _lists(short),
            "response_scores": _lists(scores),
            "prompt_norms": _lists(short + 1),
            "response_norms": _lists(norms),
            "normalized_prompt": _lists(short),
            "normalized_response": _lists(scores / norms.mean(axis=1, keepdims=True)),
        },
        schema=PROJECTION_SCHEMA,
    )
    path = vdir / "parquet" / "projections" / f"{PS}.parquet"
    path.parent.mkdir(parents=True)
    pq.write_table(table, path)
    responses = pa.table(
        {
            "prompt_set": [PS] * N_PROMPTS,
            "prompt_id": ids.tolist(),
            "prompt": ["p"] * N_PROMPTS,
            "response": [f"response number {i}" for i in range(N_PROMPTS)],
            "system_prompt": [None] * N_PROMPTS,
            "token_ids": [[1, 2]] * N_PROMPTS,
            "tokens": [["a", "b"]] * N_PROMPTS,
            "prompt_end": [1] * N_PROMPTS,
            "model": ["m"] * N_PROMPTS,
            "capture_date": ["2025-01-01"] * N_PROMPTS,
        },
        schema=RESPONSE_SCHEMA,
    )
    rpath = vdir / "parquet" / "responses" / f"{PS}.parquet"
    rpath.parent.mkdir(parents=True)
    pq.write_table(responses, rpath)
    return {
        "trait": trait_col,
        "layer": layer_col,
        "pid": pid_col,
        "scores": scores,
        "norms": norms,
        "baseline": baseline,
    }


@pytest.mark.parametrize("mode", ["raw", "cosine"])
def test_overview_on_10k_prompts(tmp_path: Path, mode: str) -> None:
    truth = _write_big_tree(tmp_path)
    srv = make_server(tmp_path, "127.0.0.1", 0, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        url = f"{srv.url}api/overview?experiment=big&variant=instruct&prompt_set={PS}"
        start = time.perf_counter()
        status, body = get_json(f"{url}&mode={mode}&centered=1&bins=20&top=5")
        elapsed = time.perf_counter() - start
    finally:
        srv.shutdown()
        srv.server_close()
    print(f"overview ({mode}, centered) on {N_PROMPTS} prompts: {elapsed * 1000:.0f} ms")
    assert status == 200, body
    assert body["n_prompts"] == N_PROMPTS
    assert len(body["groups"]) == len(TRAITS) * len(LAYERS)
    centered = truth["scores"] - truth["baseline"][:, None]
    per_row = centered.mean(axis=1) if mode == "raw" else (centered / truth["norms"]).mean(axis=1)
    for group in body["groups"]:
        rows = (truth["trait"] == group["trait"]) & (truth["layer"] == group["layer"])
        want = per_row[rows]
        assert group["n"] == N_PROMPTS and group["n_missing"] == 0
        assert group["mean"] == pytest.approx(want.mean(), rel=1e-4, abs=1e-6)
        assert group["max"] == pytest.approx(want.max(), rel=1e-4)
        assert sum(group["histogram"]["counts"]) == N_PROMPTS
        order = np.argsort(-want)[:5]
        assert [t["prompt_id"] for t in group["top"]] == truth["pid"][rows][order].tolist()
        assert group["top"][0]["preview"] == f"response number {group['top'][0]['prompt_id']}"

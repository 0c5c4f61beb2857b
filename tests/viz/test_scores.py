"""Score modes (SPEC section 6): on numbers worked out by hand, and one definition for all.

The store's numpy definition (`raypipe.store.scores`), the dashboard's readers of projection
JSON and Parquet rows, and the overview's DuckDB SQL are run on the same random table for
every mode, centered and not, so that none of them can drift from the others.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypipe.store.parquet import PROJECTIONS_SCHEMA
from raypipe.store.scores import (
    SCORE_MODES,
    ScoreMode,
    center,
    mean_score,
    normalize_projections,
)
from raypipe.viz import tables
from raypipe.viz.data import Table, segment_scores

ENTRY = {
    "baseline": 1.0,
    "response": [3.0, -1.0],
    "token_norms": {"response": [2.0, 6.0]},
    "normalized_response": [0.75, -0.25],
    "cleaned": {"response": [2.0, -2.0], "token_norms": {"response": [1.0, 3.0]}},
}


@pytest.mark.parametrize(
    ("mode", "centered", "cleaned", "already", "want"),
    [
        ("raw", False, False, False, [3.0, -1.0]),
        ("normalized", False, False, False, [0.75, -0.25]),  # the stored array
        ("cosine", False, False, False, [1.5, -1 / 6]),
        ("raw", True, False, False, [2.0, -2.0]),
        ("normalized", True, False, False, [0.5, -0.5]),  # (s - b) / mean|h| = (s - 1) / 4
        ("cosine", True, False, False, [1.0, -1 / 3]),
        ("raw", True, False, True, [3.0, -1.0]),  # already centered when projected
        ("raw", False, True, False, [2.0, -2.0]),
        ("normalized", False, True, False, [1.0, -1.0]),  # cleaned norms: mean 2
        ("cosine", False, True, False, [2.0, -2 / 3]),
        ("cosine", True, True, False, [1.0, -1.0]),
    ],
)
def test_modes(mode, centered, cleaned, already, want) -> None:
    got = segment_scores(ENTRY, "response", mode, centered, cleaned, already)
    assert got.tolist() == pytest.approx(want)


def test_normalized_without_stored_array_is_computed() -> None:
    entry = {k: v for k, v in ENTRY.items() if k != "normalized_response"}
    assert segment_scores(entry, "response", "normalized").tolist() == [0.75, -0.25]


def test_zero_norm_gives_nan_and_empty_segment_is_empty() -> None:
    entry = {"baseline": 0.0, "prompt": [1.0, 2.0], "token_norms": {"prompt": [0.0, 4.0]}}
    got = segment_scores(entry, "prompt", "cosine")
    assert np.isnan(got[0]) and got[1] == 0.5
    empty = {"baseline": 0.0, "response": [], "token_norms": {"response": []}}
    assert segment_scores(empty, "response", "normalized").size == 0


# -- one definition: numpy, the dashboard's readers and the overview's SQL agree -------------

GROUPS = [("emotion/joy", "probe", 12), ("safety/refusal", "mean_diff", 16)]
N_PROMPTS = 60
# What each tenth prompt has that the others do not (prompt i gets kind i % 10).
KINDS = {
    0: "empty response",
    1: "tokens with |h| = 0",
    2: "norms that average to 0",
    3: "a NaN norm",
    4: "a NaN score",
    5: "no baseline (null)",
    6: "centered when projected",
    7: "centered flag null",
    8: "a null norm item",
    9: "plain",
}


def _random_rows(rng: np.random.Generator) -> tuple[list[dict], dict]:
    """Projection rows in the pipeline's Parquet schema, and the raw arrays behind each."""
    rows, truth = [], {}
    for i in range(N_PROMPTS):
        kind = i % 10
        for trait, method, layer in GROUPS:
            n = 0 if kind == 0 else int(rng.integers(2, 14))
            raw = rng.normal(0.5, 3.0, n).astype(np.float32)
            norms = rng.uniform(1.0, 90.0, n).astype(np.float32)
            if kind == 1:
                norms[: n // 2] = 0.0
            if kind == 2:
                norms[:] = 0.0
            if kind == 3:
                norms[1] = np.nan
            if kind == 4:
                raw[n // 2] = np.nan
            baseline = None if kind == 5 else float(rng.normal(0.0, 1.0))
            at_source = {6: True, 7: None}.get(kind, False)
            norm_items: list = norms.tolist()
            if kind == 8:
                norm_items[0] = None
                norms[0] = np.nan  # how a reader takes a null: no number
            p = rng.normal(0.0, 1.0, 3).astype(np.float32)
            pn = rng.uniform(1.0, 9.0, 3).astype(np.float32)
            shift = (baseline or 0.0) if at_source else 0.0
            rows.append(
                {
                    "prompt_set": "random",
                    "prompt_id": str(i),
                    "trait": trait,
                    "method": method,
                    "layer": layer,
                    "component": "residual",
                    "position": "response[:]",
                    "selection_source": "steering",
                    "baseline": baseline,
                    "centered": at_source,
                    "n_prompt_tokens": 3,
                    "n_response_tokens": n,
                    "prompt_scores": p.tolist(),
                    "response_scores": raw.tolist(),
                    "prompt_norms": pn.tolist(),
                    "response_norms": norm_items,
                    # As the pipeline writes them (0.0 where undefined); no reader uses them.
                    "normalized_prompt": normalize_projections(p - shift, pn, "normalized", 0.0)
                    .astype(np.float32)
                    .tolist(),
                    "normalized_response": normalize_projections(raw, norms, "normalized", 0.0)
                    .astype(np.float32)
                    .tolist(),
                }
            )
            # The readers compute in float64 on the float32 values written: so does the truth.
            truth[(trait, method, layer, str(i))] = (
                raw.astype(np.float64),
                norms.astype(np.float64),
                baseline,
                at_source is True,
            )
    return rows, truth


@pytest.fixture(scope="module")
def random_table(tmp_path_factory: pytest.TempPathFactory) -> tuple[Table, dict]:
    rows, truth = _random_rows(np.random.default_rng(20250611))
    path = tmp_path_factory.mktemp("scores") / "random.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=PROJECTIONS_SCHEMA), path)
    return Table(path, "random.parquet"), truth


@pytest.mark.parametrize("mode", SCORE_MODES)
@pytest.mark.parametrize("centered", [False, True])
def test_sql_and_python_score_modes_agree(random_table, mode: str, centered: bool) -> None:
    """Per-prompt mean response scores three ways on one Parquet table: the store's numpy
    definition on the arrays written, the dashboard's row reader (Model Analysis) and the
    overview's DuckDB SQL. Every kind of row (KINDS) is in each group."""
    table, truth = random_table
    score = ScoreMode(mode, centered)
    got = tables.overview(table, None, mode, centered, bins=None, top=100)
    assert got["n_prompts"] == N_PROMPTS and got["warnings"] == []
    for group in got["groups"]:
        key = (group["trait"], group["method"], group["layer"])
        sql = {item["prompt_id"]: item["score"] for item in group["top"]}
        rows = tables.projection_entries(table, *key)
        want, undefined = {}, set()
        for pid in map(str, range(N_PROMPTS)):
            raw, norms, baseline, at_source = truth[(*key, pid)]
            base = np.nan if baseline is None else baseline
            expected = mean_score(score.scores(raw, norms, base, at_source))
            entry, already, _ = rows[pid]
            python = mean_score(segment_scores(entry, "response", mode, centered, False, already))
            kind = KINDS[int(pid) % 10]
            if np.isfinite(expected):
                want[pid] = expected
                assert python == pytest.approx(expected, rel=1e-12, abs=1e-12), (kind, pid)
            else:
                undefined.add(pid)
                assert np.isnan(python), (kind, pid, python)
        assert group["n"] == len(want) and group["n_missing"] == len(undefined)
        assert set(sql) == set(want), {KINDS[int(p) % 10] for p in set(sql) ^ set(want)}
        for pid, value in want.items():
            assert sql[pid] == pytest.approx(value, rel=1e-9, abs=1e-12), KINDS[int(pid) % 10]
    # Each kind decides something somewhere: a table of plain rows would prove little.
    assert len(got["groups"]) == len(GROUPS)


@pytest.mark.parametrize("centered", [False, True])
def test_the_pipeline_writes_normalized_scores_by_the_definition(centered: bool) -> None:
    """The projection JSON's `normalized_*` arrays, built by the pipeline's writer, are the
    definition's (0.0 where undefined, as trait-interp writes them), bit for bit; the engine
    keeps no copy of its own."""
    import raypipe.engine.projector as projector
    from raypipe.store.outputs import VectorInfo, projection_entry

    assert not hasattr(projector, "normalize_projections")

    rng = np.random.default_rng(3)
    for n_prompt, n_resp, zero in ((5, 9, "some"), (4, 6, "all"), (3, 0, "none")):
        scores = rng.normal(0.0, 4.0, n_prompt + n_resp).astype(np.float32)
        norms = rng.uniform(1.0, 60.0, n_prompt + n_resp).astype(np.float32)
        if zero == "some":
            norms[::3] = 0.0
        if zero == "all":
            norms[n_prompt:] = 0.0
        info = VectorInfo("emotion/joy", "probe", "response[:]", 3, "steering", 0.75)
        entry = projection_entry(info, scores, norms, n_prompt, centered)
        s = center(scores, info.baseline) if centered else scores
        for segment, part in (("prompt", slice(0, n_prompt)), ("response", slice(n_prompt, None))):
            want = normalize_projections(s[part], norms[part], "normalized", 0.0)
            assert want.dtype == np.float32
            assert np.array_equal(np.asarray(entry[f"normalized_{segment}"], np.float32), want)
            assert np.array_equal(np.asarray(entry[segment], np.float32), s[part])


def test_unknown_mode_and_mismatched_norms_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown score mode 'bogus'"):
        ScoreMode("bogus")
    with pytest.raises(ValueError, match="2 norms for 3 scores"):
        normalize_projections(np.ones(3), np.ones(2), "cosine")
    assert normalize_projections(np.ones(3), None, "raw").tolist() == [1.0, 1.0, 1.0]

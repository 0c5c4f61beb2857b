"""Score modes of one projection entry (SPEC section 6), on numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from raypipe.viz.data import segment_scores

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

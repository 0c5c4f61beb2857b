"""Score modes (SPEC section 6): one definition, in numpy and in the DuckDB SQL that mirrors it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCORE_MODES = ("raw", "normalized", "cosine")


def check_mode(mode: str) -> str:
    if mode not in SCORE_MODES:
        raise ValueError(f"unknown score mode {mode!r}; expected raw, normalized or cosine")
    return mode


def _floats(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values)
    return values.astype(np.result_type(values.dtype, np.float32), copy=False)


def center(raw: np.ndarray, baseline: float) -> np.ndarray:
    """Scores minus the vector's baseline (`--centered`), in the scores' precision. It comes
    before any division: the baseline is a raw score (the class midpoint's projection)."""
    raw = _floats(raw)  # (T,)
    return raw - raw.dtype.type(baseline)


def normalize_projections(
    raw: np.ndarray, norms: np.ndarray | None, mode: str, undefined: float = np.nan
) -> np.ndarray:
    """raw | normalized (by the segment's mean token norm) | cosine (by each token's norm).

    `raw` and `norms` are one segment's (prompt or response) scores and `|h_t|`, computed in
    their precision (float32 at least); raw scores need no norms. Where the divisor is not a
    positive number (a zero norm, a segment whose norms average to 0) no score is defined, and
    the result holds `undefined` there: NaN for a reader, so no number is shown; 0.0 in the
    files the pipeline writes, as trait-interp writes them.
    """
    check_mode(mode)
    raw = _floats(raw)  # (T,)
    if mode == "raw":
        return raw
    if norms is None:
        raise ValueError(f"{mode} scores need the token norms")
    norms = _floats(norms)  # (T,)
    if raw.shape != norms.shape:
        raise ValueError(f"{norms.size} norms for {raw.size} scores; they must match")
    dtype = np.result_type(raw.dtype, norms.dtype)
    raw, norms = raw.astype(dtype, copy=False), norms.astype(dtype, copy=False)
    if mode == "normalized":
        mean = norms.mean() if norms.size else dtype.type(0)
        if not mean > 0:  # NaN included
            return np.full_like(raw, undefined)
        return raw / mean
    out = np.full_like(raw, undefined)
    np.divide(raw, norms, out=out, where=norms > 0)
    return out


def mean_score(scores: np.ndarray) -> float:
    """A segment's mean score over the tokens that have one; NaN when none has."""
    scores = np.asarray(scores, dtype=np.float64)
    defined = scores[~np.isnan(scores)]
    return float(defined.mean()) if defined.size else float("nan")


@dataclass(frozen=True)
class ScoreMode:
    """How a reader shows scores: one of SCORE_MODES, centered on the baseline or not."""

    mode: str = "raw"
    centered: bool = False

    def __post_init__(self) -> None:
        check_mode(self.mode)
        if not isinstance(self.centered, bool):
            raise ValueError(f"centered must be true or false, got {self.centered!r}")

    def shifts(self, centered_at_source: bool) -> bool:
        """Whether the baseline is still to subtract: scores projected with `--centered`
        already had it subtracted."""
        return self.centered and not centered_at_source

    def scores(
        self,
        raw: np.ndarray,
        norms: np.ndarray | None,
        baseline: float,
        centered_at_source: bool = False,
        undefined: float = np.nan,
    ) -> np.ndarray:
        """One segment's scores in this mode (SPEC section 6)."""
        if self.shifts(centered_at_source):
            raw = center(raw, baseline)
        return normalize_projections(raw, norms, self.mode, undefined)

    # -- the same, in DuckDB SQL -------------------------------------------------------------
    # Checked against the numpy definition above, mode by mode, on a Parquet table of the
    # pipeline's schema, in tests/viz/test_scores.py.

    def sql_shift(self, baseline: str, centered_at_source: str) -> str:
        """A DuckDB expression for what `scores` subtracts from a row's raw scores, over its
        `baseline` and `centered_at_source` columns (a NULL flag counts as false)."""
        if not self.centered:
            return "0::DOUBLE"
        return f"(CASE WHEN coalesce({centered_at_source}, false) THEN 0 ELSE {baseline} END)"

    def sql_mean(self, scores: str, norms: str, shift: str) -> str:
        """A DuckDB expression for `mean_score(self.scores(...))` of one row, over its list
        columns `scores` and `norms` and the `sql_shift` value `shift`. A NULL in a list reads
        as NaN, as a JSON null does."""
        # DuckDB orders NaN above every number, so `NaN > 0` is true there and must be ruled
        # out by hand; a NULL makes the predicate NULL, which is not true either. The lists
        # hold float32: every step is in DOUBLE, as the readers' numpy is in float64.
        positive = "({d} > 0 AND NOT isnan({d}))"
        if self.mode == "cosine":
            norm = f"{norms}[i]::DOUBLE"
            per_token = (
                f"list_transform({scores}, lambda x, i: CASE WHEN "
                f"{positive.format(d=norm)} THEN (x::DOUBLE - {shift}) / {norm} END)"
            )
        else:
            per_token = f"list_transform({scores}, lambda x: x::DOUBLE - {shift})"
        mean = f"list_avg(list_filter({per_token}, lambda y: NOT isnan(y)))"
        if self.mode != "normalized":
            return mean
        # The mean norm is over every token: a NULL norm is NaN, as in numpy, not skipped.
        norm = f"list_avg(list_transform({norms}, lambda x: coalesce(x::DOUBLE, 'NaN'::DOUBLE)))"
        return f"(CASE WHEN {positive.format(d=norm)} THEN {mean} / {norm} END)"

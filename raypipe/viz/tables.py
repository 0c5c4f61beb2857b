"""Parquet reads for the dashboard: DuckDB aggregates for the overview, rows for model diffs."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.parquet as pq

from raypipe.viz.data import ApiError

if TYPE_CHECKING:
    import duckdb

# Per-prompt mean response score in each mode; `shift` is the baseline when centering.
# Centering comes before the division because the baseline is in raw units (SPEC section 6).
_MEAN_EXPR = {
    "raw": "list_avg(s) - shift",
    "normalized": "(list_avg(s) - shift) / nullif(list_avg(n), 0)",
    "cosine": (
        "list_avg(list_transform(s, lambda x, i: CASE WHEN n[i] > 0 THEN (x - shift) / n[i] END))"
    ),
}


def connect() -> duckdb.DuckDBPyConnection:
    """A private in-memory DuckDB that never spills or installs anything near the data."""
    try:
        import duckdb
    except ImportError:
        # Only the overview needs DuckDB; the rest of the dashboard runs without it.
        raise ApiError(501, "the overview needs DuckDB: pip install 'raypipe[viz]'") from None
    return duckdb.connect(
        ":memory:",
        config={
            # The default spill folder is `.tmp` in the working directory, which may be ROOT.
            "temp_directory": str(Path(tempfile.gettempdir()) / "raypipe-viz-duckdb"),
            "autoinstall_known_extensions": False,
        },
    )


def _query(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any], path: Path) -> dict:
    import duckdb

    try:
        return con.execute(sql, params).fetchnumpy()
    except duckdb.Error as err:
        raise ApiError(422, f"cannot read Parquet table {path.name}: {err}") from None


def overview(
    path: Path,
    responses: Path | None,
    mode: str,
    centered: bool,
    bins: int | None,
    top: int,
) -> dict[str, Any]:
    """Histogram and top prompts of mean response scores, per (trait, method, layer, component)."""
    sql = f"""
        WITH rows AS (
            SELECT trait, method, layer, component, prompt_id,
                   CASE WHEN ? AND NOT coalesce(centered, false) THEN baseline ELSE 0 END AS shift,
                   response_scores AS s, response_norms AS n
            FROM read_parquet(?)
        )
        SELECT trait, method, layer, component, prompt_id, {_MEAN_EXPR[mode]} AS score
        FROM rows
        ORDER BY trait, method, layer, component
    """
    con = connect()
    try:
        cols = _query(con, sql, [centered, str(path)], path)
        groups = _groups(cols, bins, top)
        wanted = sorted({p["prompt_id"] for g in groups for p in g["top"]})
        previews = _previews(con, responses, wanted) if responses and wanted else {}
    finally:
        con.close()
    for group in groups:
        for item in group["top"]:
            item["preview"] = previews.get(item["prompt_id"], "")
    n_prompts = len(set(np.asarray(cols["prompt_id"]).tolist())) if len(cols["prompt_id"]) else 0
    return {"n_prompts": n_prompts, "groups": groups}


def _groups(cols: dict, bins: int | None, top: int) -> list[dict[str, Any]]:
    n = len(cols["trait"])
    if n == 0:
        return []
    keys = [np.asarray(cols[k]) for k in ("trait", "method", "layer", "component")]
    change = np.zeros(n - 1, dtype=bool)
    for key in keys:
        change |= key[1:] != key[:-1]
    starts = np.concatenate([[0], np.flatnonzero(change) + 1, [n]])
    score_col = cols["score"]
    # DuckDB hands back NULL means (empty responses) as a masked array.
    scores = np.ma.filled(np.ma.asarray(score_col, dtype=np.float64), np.nan)
    ids = np.asarray(cols["prompt_id"]).astype(str)
    out = []
    for lo, hi in zip(starts[:-1], starts[1:], strict=True):
        vals, pids = scores[lo:hi], ids[lo:hi]
        ok = np.isfinite(vals)
        vals, pids = vals[ok], pids[ok]
        group: dict[str, Any] = {
            "trait": str(keys[0][lo]),
            "method": str(keys[1][lo]),
            "layer": int(keys[2][lo]),
            "component": str(keys[3][lo]),
            "n": int(vals.size),
            "n_missing": int((~ok).sum()),
        }
        if vals.size:
            # About sqrt(n) bins unless asked: readable for 5 prompts and for 10,000.
            n_bins = bins or int(np.clip(np.ceil(np.sqrt(vals.size)), 5, 40))
            counts, edges = np.histogram(vals, bins=n_bins)
            order = np.argsort(-vals, kind="stable")[:top]
            group.update(
                mean=float(vals.mean()),
                std=float(vals.std()),
                min=float(vals.min()),
                max=float(vals.max()),
                histogram={"edges": edges.tolist(), "counts": counts.tolist()},
                top=[{"prompt_id": str(pids[i]), "score": float(vals[i])} for i in order],
            )
        else:
            group.update(mean=None, std=None, min=None, max=None, histogram=None, top=[])
        out.append(group)
    return out


def _previews(con: duckdb.DuckDBPyConnection, path: Path, ids: list[str]) -> dict[str, str]:
    sql = """
        SELECT prompt_id, left(response, 160) AS preview FROM read_parquet(?)
        WHERE prompt_id IN (SELECT unnest(?::VARCHAR[]))
    """
    cols = _query(con, sql, [str(path), ids], path)
    return dict(zip(map(str, cols["prompt_id"]), map(str, cols["preview"]), strict=True))


def previews(path: Path) -> dict[str, str]:
    """First characters of every response in a responses table, for the prompt picker."""
    try:
        table = pq.read_table(path, columns=["prompt_id", "response"])
    except (OSError, ValueError, KeyError) as err:
        raise ApiError(422, f"cannot read Parquet table {path.name}: {err}") from None
    ids = table.column("prompt_id").to_pylist()
    texts = table.column("response").to_pylist()
    return {str(i): (t or "")[:90] for i, t in zip(ids, texts, strict=True)}


_ENTRY_COLUMNS = [
    "prompt_id",
    "trait",
    "method",
    "layer",
    "baseline",
    "centered",
    "prompt_scores",
    "response_scores",
    "prompt_norms",
    "response_norms",
    "normalized_prompt",
    "normalized_response",
]


def projection_entries(
    path: Path, trait: str, method: str, layer: int
) -> dict[str, tuple[dict[str, Any], bool]]:
    """Rows of one trait/method/layer as projection-JSON-shaped entries, keyed by prompt id.

    Each value is `(entry, centered_at_source)` so the JSON and Parquet paths share one
    scoring function.
    """
    filters = [("trait", "=", trait), ("method", "=", method), ("layer", "=", layer)]
    try:
        rows = pq.read_table(path, columns=_ENTRY_COLUMNS, filters=filters).to_pylist()
    except (OSError, ValueError, KeyError) as err:
        raise ApiError(422, f"cannot read Parquet table {path.name}: {err}") from None
    out = {}
    for row in rows:
        entry = {
            "prompt": row["prompt_scores"] or [],
            "response": row["response_scores"] or [],
            "token_norms": {
                "prompt": row["prompt_norms"] or [],
                "response": row["response_norms"] or [],
            },
            "normalized_prompt": row["normalized_prompt"],
            "normalized_response": row["normalized_response"],
            "baseline": row["baseline"] if row["baseline"] is not None else 0.0,
            "layer": row["layer"],
            "method": row["method"],
        }
        out[str(row["prompt_id"])] = (entry, bool(row["centered"]))
    return out


def response_tokens(path: Path) -> dict[str, tuple[list[str], int]]:
    """`prompt_id -> (tokens, prompt_end)` from a responses table."""
    try:
        rows = pq.read_table(path, columns=["prompt_id", "tokens", "prompt_end"]).to_pylist()
    except (OSError, ValueError, KeyError) as err:
        raise ApiError(422, f"cannot read Parquet table {path.name}: {err}") from None
    return {str(r["prompt_id"]): (r["tokens"] or [], int(r["prompt_end"] or 0)) for r in rows}

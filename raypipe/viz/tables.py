"""Parquet reads for the dashboard: DuckDB aggregates for the overview, rows for model diffs."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raypipe.store.scores import ScoreMode
from raypipe.viz.data import ApiError, Table, file_error

if TYPE_CHECKING:
    import duckdb


def _is_text(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_list_of(t: pa.DataType, item: Callable[[pa.DataType], bool]) -> bool:
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and item(t.value_type)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


# What a reader needs of a column: a predicate on its Arrow type and how to say it. The
# pipeline writes these types (store/parquet.py); a table from elsewhere may not.
_KINDS: dict[str, tuple[Callable[[pa.DataType], bool], str]] = {
    "text": (_is_text, "strings"),
    "id": (lambda t: _is_text(t) or pa.types.is_integer(t), "strings or integers"),
    "integer": (pa.types.is_integer, "integers"),
    "number": (_is_number, "numbers"),
    "boolean": (pa.types.is_boolean, "booleans"),
    "numbers": (lambda t: _is_list_of(t, _is_number), "lists of numbers"),
    "texts": (lambda t: _is_list_of(t, _is_text), "lists of strings"),
}
_PROJECTION_KEYS = {
    "trait": "text",
    "method": "text",
    "layer": "integer",
    "component": "text",
    "prompt_id": "id",
}


def check_columns(table: Table, needs: dict[str, str]) -> None:
    """422 naming the table and column unless it has each needed column with a usable type."""
    try:
        schema = pq.read_schema(table.path)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise file_error(
            422, table.where, "file", f"not a readable Parquet table ({err})"
        ) from None
    for column, kind in needs.items():
        if column not in schema.names:
            raise file_error(422, table.where, column, "missing column")
        ok, what = _KINDS[kind]
        found = schema.field(column).type
        if not ok(found):
            raise file_error(422, table.where, column, f"must be {what}, not {found}")


def _read(table: Table, columns: list[str], filters: list | None = None) -> pa.Table:
    try:
        return pq.read_table(table.path, columns=columns, filters=filters)
    except (OSError, ValueError, KeyError, pa.ArrowException) as err:
        raise file_error(
            422, table.where, "file", f"not a readable Parquet table ({err})"
        ) from None


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


def _query(con: duckdb.DuckDBPyConnection, sql: str, params: list[Any], table: Table) -> dict:
    import duckdb

    try:
        return con.execute(sql, params).fetchnumpy()
    except duckdb.Error as err:
        raise file_error(422, table.where, "file", f"DuckDB cannot read it: {err}") from None


def overview(
    table: Table,
    responses: Table | None,
    mode: str,
    centered: bool,
    bins: int | None,
    top: int,
) -> dict[str, Any]:
    """Histogram and top prompts of mean response scores, per (trait, method, layer, component)."""
    check_columns(
        table,
        {
            **_PROJECTION_KEYS,
            "centered": "boolean",
            "baseline": "number",
            "response_scores": "numbers",
            "response_norms": "numbers",
        },
    )
    warnings = []
    if responses is not None:
        try:
            check_columns(responses, {"prompt_id": "id", "response": "text"})
        except ApiError as err:
            # Previews only label the top prompts: go without them rather than fail.
            warnings.append(err.message)
            responses = None
    # The mean response score of each prompt, by the store's definition of the mode.
    score = ScoreMode(mode, centered)
    sql = f"""
        WITH rows AS (
            SELECT trait, method, layer, component, prompt_id,
                   {score.sql_shift("baseline", "centered")} AS shift,
                   response_scores AS s, response_norms AS n
            FROM read_parquet(?)
        )
        SELECT trait, method, layer, component, prompt_id,
               {score.sql_mean("s", "n", "shift")} AS score
        FROM rows
        ORDER BY trait, method, layer, component
    """
    con = connect()
    try:
        cols = _query(con, sql, [str(table.path)], table)
        cols, dropped = _without_null_keys(cols)
        groups = _groups(cols, bins, top)
        wanted = sorted({p["prompt_id"] for g in groups for p in g["top"]})
        previews = _previews(con, responses, wanted) if responses and wanted else {}
    finally:
        con.close()
    for group in groups:
        for item in group["top"]:
            item["preview"] = previews.get(item["prompt_id"], "")
    n_prompts = len(set(np.asarray(cols["prompt_id"]).tolist())) if len(cols["prompt_id"]) else 0
    if dropped:
        keys = ", ".join(list(_PROJECTION_KEYS)[:-1]) + f" or {list(_PROJECTION_KEYS)[-1]}"
        rows = "row" if dropped == 1 else "rows"
        warnings.append(f"{table.where}: {dropped} {rows} without {keys} left out")
    return {"n_prompts": n_prompts, "groups": groups, "warnings": warnings}


def _without_null_keys(cols: dict) -> tuple[dict, int]:
    """The rows whose grouping keys are all set, and how many were not."""
    n = len(cols["trait"])
    null = np.zeros(n, dtype=bool)
    for key in _PROJECTION_KEYS:
        col = cols[key]
        null |= np.ma.getmaskarray(col)
        if np.asarray(col).dtype == object:
            null |= np.array([v is None for v in np.asarray(col)], dtype=bool)
    if not null.any():
        return cols, 0
    keep = ~null
    return {k: v[keep] for k, v in cols.items()}, int(null.sum())


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


def _previews(con: duckdb.DuckDBPyConnection, table: Table, ids: list[str]) -> dict[str, str]:
    sql = """
        SELECT prompt_id, left(response, 160) AS preview FROM read_parquet(?)
        WHERE CAST(prompt_id AS VARCHAR) IN (SELECT unnest(?::VARCHAR[]))
    """
    cols = _query(con, sql, [str(table.path), ids], table)
    return dict(zip(map(str, cols["prompt_id"]), map(str, cols["preview"]), strict=True))


def previews(table: Table) -> dict[str, str]:
    """First characters of every response in a responses table, for the prompt picker."""
    check_columns(table, {"prompt_id": "id", "response": "text"})
    rows = _read(table, ["prompt_id", "response"])
    ids = rows.column("prompt_id").to_pylist()
    texts = rows.column("response").to_pylist()
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
]


_ENTRY_KINDS = {
    **_PROJECTION_KEYS,
    "baseline": "number",
    "centered": "boolean",
    "prompt_scores": "numbers",
    "response_scores": "numbers",
    "prompt_norms": "numbers",
    "response_norms": "numbers",
}


def projection_entries(
    table: Table, trait: str, method: str, layer: int
) -> dict[str, tuple[dict[str, Any], bool, str]]:
    """Rows of one trait/method/layer as projection-JSON-shaped entries, keyed by prompt id.

    Each value is `(entry, centered_at_source, where)` so the JSON and Parquet paths share
    one scoring function.
    """
    check_columns(table, {k: v for k, v in _ENTRY_KINDS.items() if k != "component"})
    filters = [("trait", "=", trait), ("method", "=", method), ("layer", "=", layer)]
    rows = _read(table, _ENTRY_COLUMNS, filters).to_pylist()
    out = {}
    for row in rows:
        entry = {
            "prompt": row["prompt_scores"] or [],
            "response": row["response_scores"] or [],
            "token_norms": {
                "prompt": row["prompt_norms"] or [],
                "response": row["response_norms"] or [],
            },
            # An unknown baseline centers to no number, as the overview's SQL has it.
            "baseline": row["baseline"] if row["baseline"] is not None else float("nan"),
            "layer": row["layer"],
            "method": row["method"],
        }
        pid = str(row["prompt_id"])
        out[pid] = (entry, row["centered"] is True, f"{table.where}: prompt {pid}")
    return out


def response_tokens(table: Table) -> dict[str, tuple[list[str], int]]:
    """`prompt_id -> (tokens, prompt_end)` from a responses table."""
    check_columns(table, {"prompt_id": "id", "tokens": "texts", "prompt_end": "integer"})
    rows = _read(table, ["prompt_id", "tokens", "prompt_end"]).to_pylist()
    return {str(r["prompt_id"]): (r["tokens"] or [], r["prompt_end"] or 0) for r in rows}

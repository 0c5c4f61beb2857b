"""Parquet tables (projections, responses) per prompt set: written in parts by the workers as a
run goes, folded into one table per prompt set by `compact`, newest row per key winning.

A part is one writer call's rows, written whole (temp file, fsync, rename: its name appearing
is its completion record). A part's rows may carry `replaces`: that row's prompt (and trait)
had its outputs rewritten from scratch (a regenerated response, a projection file replaced),
so every older row of that prompt (and trait) goes, not only those with the same key.
Compaction is idempotent: killed half-way, the next one gives the same table.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raypipe.errors import InputError, OutputError
from raypipe.store.atomic import TempFile, write_with
from raypipe.store.outputs import read_projection, read_response
from raypipe.store.paths import PART_SUFFIX, ExperimentPaths

_F32 = pa.list_(pa.float32())
PROJECTIONS_SCHEMA = pa.schema(
    [
        ("prompt_set", pa.string()),
        ("prompt_id", pa.string()),
        ("trait", pa.string()),
        ("method", pa.string()),
        ("layer", pa.int32()),
        ("component", pa.string()),
        ("position", pa.string()),
        ("selection_source", pa.string()),
        ("baseline", pa.float64()),
        ("centered", pa.bool_()),
        ("n_prompt_tokens", pa.int32()),
        ("n_response_tokens", pa.int32()),
        ("prompt_scores", _F32),
        ("response_scores", _F32),
        ("prompt_norms", _F32),
        ("response_norms", _F32),
        ("normalized_prompt", _F32),
        ("normalized_response", _F32),
    ]
)
RESPONSES_SCHEMA = pa.schema(
    [
        ("prompt_set", pa.string()),
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("response", pa.string()),
        ("system_prompt", pa.string()),
        ("token_ids", pa.list_(pa.int64())),
        ("tokens", pa.list_(pa.string())),
        ("prompt_end", pa.int32()),
        ("model", pa.string()),
        ("capture_date", pa.string()),
    ]
)
ROWS_PER_GROUP = 2048
TABLES = ("projections", "responses")
SCHEMAS = {"projections": PROJECTIONS_SCHEMA, "responses": RESPONSES_SCHEMA}
# A row's identity in its table, and the group a `replaces` row clears.
KEYS = {
    "projections": ("prompt_id", "trait", "method", "layer", "component"),
    "responses": ("prompt_id",),
}
GROUPS = {"projections": ("prompt_id", "trait"), "responses": ("prompt_id",)}
REPLACES = "replaces"  # a column of parts only


def _id_sort_key(path: Path):
    stem = path.stem
    # isascii: "²".isdigit() is True, but int("²") raises.
    return (0, int(stem), "") if stem.isascii() and stem.isdigit() else (1, 0, stem)


def _json_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(
        (p for p in folder.glob("*.json") if not p.name.startswith(".")), key=_id_sort_key
    )


def projection_traits(paths: ExperimentPaths, variant: str, prompt_set: str) -> list[str]:
    root = paths.projections_root(variant)
    if not root.is_dir():
        return []
    return sorted(
        f"{c.name}/{n.name}"
        for c in root.iterdir()
        if c.is_dir()
        for n in c.iterdir()
        if (n / prompt_set).is_dir()
    )


def _readable(read, f: Path, unreadable: list[str] | None):
    """`read(f)`, or None for a broken file when the caller collects them in `unreadable`."""
    try:
        return read(f)
    except InputError as e:
        if unreadable is None:
            raise
        unreadable.append(str(e))
        return None


def projection_rows(record: dict, trait: str, prompt_id: str, prompt_set: str) -> list[dict]:
    """The table's rows for one projection record (one prompt, one trait): one per entry."""
    meta = record["metadata"]
    return [
        {
            "prompt_set": prompt_set,
            "prompt_id": prompt_id,
            "trait": trait,
            "method": e["method"],
            "layer": e["layer"],
            "component": meta["component"],
            "position": meta["position"],
            "selection_source": e["selection_source"],
            "baseline": e["baseline"],
            "centered": meta["centered"],
            "n_prompt_tokens": meta["n_prompt_tokens"],
            "n_response_tokens": meta["n_response_tokens"],
            "prompt_scores": e["prompt"],
            "response_scores": e["response"],
            "prompt_norms": e["token_norms"]["prompt"],
            "response_norms": e["token_norms"]["response"],
            "normalized_prompt": e["normalized_prompt"],
            "normalized_response": e["normalized_response"],
        }
        for e in record["projections"]
    ]


def response_row(record: dict, prompt_id: str, prompt_set: str) -> dict:
    """The table's row for one response record."""
    return {
        "prompt_set": prompt_set,
        "prompt_id": prompt_id,
        "prompt": record["prompt"],
        "response": record["response"],
        "system_prompt": record.get("system_prompt"),
        "token_ids": record["token_ids"],
        "tokens": record["tokens"],
        "prompt_end": record["prompt_end"],
        "model": record.get("inference_model"),
        "capture_date": record.get("capture_date"),
    }


def _projection_rows(paths, variant, prompt_set, unreadable=None) -> Iterator[dict]:
    for trait in projection_traits(paths, variant, prompt_set):
        folder = paths.projections_root(variant) / trait / prompt_set
        for f in _json_files(folder):
            rec = _readable(read_projection, f, unreadable)
            if rec is not None:
                yield from projection_rows(rec, trait, f.stem, prompt_set)


def _response_rows(paths, variant, prompt_set, unreadable=None) -> Iterator[dict]:
    for f in _json_files(paths.responses_dir(variant, prompt_set)):
        r = _readable(read_response, f, unreadable)
        if r is not None:
            yield response_row(r, f.stem, prompt_set)


def _write_table(target: Path, schema: pa.Schema, rows: Iterator[dict]) -> int:
    """Stream rows into row groups (memory stays flat), then rename into place."""
    count = 0

    def fill(tmp: str) -> None:
        nonlocal count
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            buf: list[dict] = []
            for row in rows:
                buf.append(row)
                if len(buf) >= ROWS_PER_GROUP:
                    writer.write_table(pa.Table.from_pylist(buf, schema=schema))
                    count += len(buf)
                    buf = []
            if buf or count == 0:
                writer.write_table(pa.Table.from_pylist(buf, schema=schema))
                count += len(buf)

    write_with(target, fill)
    return count


# ---------------------------------------------------------------- parts and compaction


def write_part(
    paths: ExperimentPaths,
    variant: str,
    table: str,
    prompt_set: str,
    rows: list[dict],
    replaces: list[bool],
) -> Path | None:
    """One writer call's rows of `table`, as a part (None when there are none)."""
    if not rows:
        return None
    data = pa.Table.from_pylist(rows, schema=SCHEMAS[table])
    data = data.append_column(REPLACES, pa.array(replaces, pa.bool_()))
    # Named by time first: compaction applies parts in the order they were written.
    name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}{PART_SUFFIX}"
    target = paths.parquet_parts(variant, table, prompt_set) / name
    return write_with(target, lambda tmp: pq.write_table(data, tmp, compression="zstd"))


def _parts(paths: ExperimentPaths, variant: str, table: str, prompt_set: str) -> list[Path]:
    folder = paths.parquet_parts(variant, table, prompt_set)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(PART_SUFFIX))


def _joined(data: pa.Table, columns: tuple[str, ...]) -> pa.Array:
    """One string per row naming its key (or group): what set membership is tested on."""
    parts = [pc.cast(data.column(c), pa.string()) for c in columns]
    return pc.binary_join_element_wise(*parts, "\x1f") if len(parts) > 1 else parts[0]


def _key_columns(table: str) -> list[str]:
    return list(dict.fromkeys([*KEYS[table], *GROUPS[table], REPLACES]))


def _keep(keys: pa.Array, groups: pa.Array, flags: pa.Array, part: pa.Array):
    """Which of the parts' rows stay (`part`: each row's part, in write order): the newest per
    key (later parts, later rows win), less the rows a later part's `replaces` rows cleared.
    Returns (keep mask, the keys kept, the groups cleared in the old table). Keys alone: a
    table's scores are never in memory for this."""
    order = pa.array(np.arange(len(keys)))
    last = pa.table({"k": keys, "i": order}).group_by("k").aggregate([("i", "max")])
    keep = pc.is_in(order, value_set=last.column("i_max"))
    # Rows with `replaces` stand for their group's whole content as of their part: the
    # group's rows in earlier parts go (and all of its rows in the table).
    flagged = pc.filter(pa.table({"g": groups, "p": part}), flags)
    if flagged.num_rows:
        latest = flagged.group_by("g").aggregate([("p", "max")])
        at = pc.index_in(groups, value_set=latest.column("g"))  # null: a group never replaced
        cut_at = pc.fill_null(pc.take(latest.column("p_max"), at), -1)
        keep = pc.and_(keep, pc.greater_equal(part, cut_at))
    return keep, pc.unique(pc.filter(keys, keep)), pc.unique(flagged.column("g"))


def _part_keys(table: str, data: pa.Table) -> tuple[pa.Array, pa.Array, pa.Array]:
    return _joined(data, KEYS[table]), _joined(data, GROUPS[table]), data.column(REPLACES)


def _with_flag(table: str) -> pa.Schema:
    """A part's schema: its table's, plus the `replaces` column."""
    return SCHEMAS[table].append(pa.field(REPLACES, pa.bool_()))


def _read_keys(table: str, parts: list[Path]) -> tuple[list[int], tuple[pa.Array, ...]]:
    """The parts' rows counts, and (keys, groups, replaces) of all their rows in order: only
    the key columns are read."""
    cols, schema = _key_columns(table), _with_flag(table)
    got = [_part_keys(table, pq.read_table(p, columns=cols, schema=schema)) for p in parts]
    return [len(k) for k, _, _ in got], tuple(_concat([g[i] for g in got]) for i in range(3))


def _concat(arrays: list) -> pa.Array:
    chunks = [a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in arrays]
    return pa.concat_arrays(chunks)


def _newest(table: str, new: pa.Table, part: pa.Array) -> tuple[pa.Table, pa.Array, pa.Array]:
    """`_keep` applied to rows in memory (small sets: what `current` reads)."""
    keep, keys, cleared = _keep(*_part_keys(table, new), part)
    return pc.filter(new, keep).drop_columns([REPLACES]), keys, cleared


def _stale(table: str, old: pa.Table, keys: pa.Array, cleared: pa.Array) -> pa.Array:
    """Rows of the old table that the parts' rows replace."""
    return pc.or_(
        pc.is_in(_joined(old, KEYS[table]), value_set=keys),
        pc.is_in(_joined(old, GROUPS[table]), value_set=cleared),
    )


class _RowGroups:
    """A ParquetWriter fed tables of any size, written in row groups of ROWS_PER_GROUP."""

    def __init__(self, name: str, schema: pa.Schema):
        self.writer = pq.ParquetWriter(name, schema, compression="zstd")
        self.schema, self.buf, self.held, self.count = schema, [], 0, 0

    def add(self, data: pa.Table) -> None:
        if data.num_rows:
            self.buf.append(data.select(self.schema.names).cast(self.schema))
            self.held += data.num_rows
            self.count += data.num_rows
        if self.held >= ROWS_PER_GROUP:
            self._flush()

    def _flush(self) -> None:
        if self.buf:
            self.writer.write_table(pa.concat_tables(self.buf), row_group_size=ROWS_PER_GROUP)
        self.buf, self.held = [], 0

    def close(self) -> int:
        self._flush()
        if self.count == 0:
            self.writer.write_table(self.schema.empty_table())
        self.writer.close()
        return self.count

    def abort(self) -> None:
        self.writer.close()


def _add_old(out: _RowGroups, table: str, target: Path, keys, cleared) -> None:
    """The old table, streamed row group by row group, less the rows the parts replace."""
    if not target.is_file():
        return
    schema = SCHEMAS[table]
    for batch in pq.ParquetFile(target).iter_batches(ROWS_PER_GROUP):
        old = pa.Table.from_batches([batch], schema=schema)
        out.add(pc.filter(old, pc.invert(_stale(table, old, keys, cleared))))


def _drop_parts(parts: list[Path]) -> None:
    for p in parts:  # only now: killed before this, the next compaction folds them again
        p.unlink(missing_ok=True)
    if parts:
        try:
            parts[0].parent.rmdir()
        except OSError:
            pass


def compact(
    paths: ExperimentPaths, variant: str, prompt_set: str, create: bool = True
) -> dict[str, tuple[Path, int]]:
    """Fold every finished part into its table: {table: (path, rows)}. With `create`, a table
    that has neither file nor parts is written empty (a run's end); without, left absent."""
    out = {}
    for table in TABLES:
        got = _compact(paths, variant, prompt_set, table, create)
        if got is not None:
            out[table] = got
    return out


def _compact(paths: ExperimentPaths, variant: str, prompt_set: str, table: str, create: bool):
    """Parts go once their rows are in. Two passes over the parts, one part in memory at a
    time: their keys first (what stays), then their rows; the old table streams through row
    group by row group. Memory holds keys, never a table's scores."""
    target = paths.parquet_file(variant, table, prompt_set)
    schema = SCHEMAS[table]
    parts = _parts(paths, variant, table, prompt_set)
    if not parts:
        if not target.is_file() and not create:
            return None
        if not target.is_file():
            write_with(target, lambda tmp: pq.write_table(schema.empty_table(), tmp))
        return target, pq.ParquetFile(target).metadata.num_rows
    with_flag = _with_flag(table)
    sizes, got = _read_keys(table, parts)
    keep, keys, cleared = _keep(*got, pa.array(np.repeat(np.arange(len(parts)), sizes)))
    del got
    count = 0

    def fill(tmp: str) -> None:
        nonlocal count
        out = _RowGroups(tmp, schema)
        try:
            _add_old(out, table, target, keys, cleared)
            start = 0
            for p, n in zip(parts, sizes):
                rows = pq.read_table(p, schema=with_flag).drop_columns([REPLACES])
                out.add(pc.filter(rows, keep.slice(start, n)))
                start += n
        except BaseException:
            out.abort()
            raise
        count = out.close()

    write_with(target, fill)
    _drop_parts(parts)
    return target, count


class TableFold:
    """Compaction that goes on while a run writes its parts: `step` appends the parts finished
    since the last step to the new table (a temp file), so the run's end has only its last parts
    and the old table left to fold. Appending is exact when no part's row replaces another
    part's: every prompt's rows in one part, each key once (a batch Ray retried after a worker
    died writes its prompts twice). `finish` checks that and otherwise does the whole compaction
    from the parts, which stay on disk until the new table is in place. Memory holds a few
    strings per prompt (its id), not per row. Rows: this run's first, then the old table's."""

    def __init__(self, paths: ExperimentPaths, variant: str, prompt_set: str, table: str):
        self.paths, self.variant, self.prompt_set, self.table = paths, variant, prompt_set, table
        self.target = paths.parquet_file(variant, table, prompt_set)
        self.schema = SCHEMAS[table]
        self.folded: list[Path] = []
        self.ids: list[pa.Array] = []  # each part's prompt ids, once each
        self.exact = True
        self.temp: TempFile | None = None
        self.out: _RowGroups | None = None

    def step(self) -> int:
        """Append the parts finished since the last step; returns how many."""
        seen = {p.name for p in self.folded}
        new = [
            p
            for p in _parts(self.paths, self.variant, self.table, self.prompt_set)
            if p.name not in seen
        ]
        if new and self.out is None:
            self.temp = TempFile(self.target)
            self.out = _RowGroups(self.temp.name, self.schema)
        with_flag = _with_flag(self.table)
        for p in new:
            data = pq.read_table(p, schema=with_flag)
            keys = _joined(data, KEYS[self.table])
            self.exact &= pc.count_distinct(keys).as_py() == data.num_rows
            self.ids.append(pc.unique(data.column("prompt_id")))
            self.out.add(data.drop_columns([REPLACES]))
            self.folded.append(p)
        return len(new)

    def finish(self) -> tuple[Path, int]:
        """The table with every part folded in (as `compact` makes it)."""
        try:
            self.step()
        except BaseException:
            self.abandon()
            raise
        if self.out is None:  # no part: the old table as it is (or an empty one)
            return _compact(self.paths, self.variant, self.prompt_set, self.table, True)
        ids = _concat(self.ids)
        if not (self.exact and pc.count_distinct(ids).as_py() == len(ids)):
            self.abandon()
            return _compact(self.paths, self.variant, self.prompt_set, self.table, True)
        try:
            if self.target.is_file():
                # What the old table loses: the keys the parts hold, the groups they replace.
                _, (keys, groups, flags) = _read_keys(self.table, self.folded)
                cleared = pc.unique(pc.filter(groups, flags))
                _add_old(self.out, self.table, self.target, pc.unique(keys), cleared)
            count = self.out.close()
        except BaseException as e:
            self.abandon()
            if isinstance(e, OSError):
                raise OutputError(self.target, os.strerror(e.errno) if e.errno else str(e)) from e
            raise
        self.out = None
        self.temp.commit()
        self.temp = None
        _drop_parts(self.folded)
        return self.target, count

    def abandon(self) -> None:
        """Drop the temp table (the parts stay: the next compaction folds them)."""
        if self.out is not None:
            self.out.abort()
            self.out = None
        if self.temp is not None:
            self.temp.discard()
            self.temp = None


def current(
    paths: ExperimentPaths, variant: str, table: str, prompt_set: str, columns=None
) -> pa.Table:
    """The table as compaction would make it now (the table and its finished parts), in
    `columns` (all by default): what exists, for runs that write no JSON files."""
    schema = SCHEMAS[table]
    names = list(dict.fromkeys([*KEYS[table], *GROUPS[table], *(columns or schema.names)]))
    sub = pa.schema([schema.field(n) for n in names])
    parts = _parts(paths, variant, table, prompt_set)
    read = [pq.read_table(p, schema=sub.append(pa.field(REPLACES, pa.bool_()))) for p in parts]
    target = paths.parquet_file(variant, table, prompt_set)
    old = pq.read_table(target, columns=names, schema=schema) if target.is_file() else None
    if not read:
        return old.select(names) if old is not None else sub.empty_table()
    part = pa.array(np.repeat(np.arange(len(read)), [t.num_rows for t in read]))
    rows, keys, cleared = _newest(table, pa.concat_tables(read), part)
    if old is None:
        return rows
    stale = _stale(table, old, keys, cleared)
    return pa.concat_tables([pc.filter(old, pc.invert(stale)).select(names), rows])


def stored_responses(
    paths: ExperimentPaths, variant: str, prompt_set: str, ids: list[str]
) -> dict[str, dict]:
    """{prompt_id: response row} of the table for `ids` (after compaction: the table alone)."""
    target = paths.parquet_file(variant, "responses", prompt_set)
    if not target.is_file() or not ids:
        return {}
    data = pq.read_table(target, filters=[("prompt_id", "in", list(ids))])
    return {r["prompt_id"]: r for r in data.to_pylist()}


def build_parquet(
    paths: ExperimentPaths, variant: str, prompt_set: str, unreadable: list[str] | None = None
) -> dict[str, tuple[Path, int]]:
    """Rebuild both tables from the JSON files: re-runs can never duplicate rows. With a list
    `unreadable`, a broken file is left out and named there instead of failing the build."""
    out = {}
    for table, schema, rows in (
        (
            "projections",
            PROJECTIONS_SCHEMA,
            _projection_rows(paths, variant, prompt_set, unreadable),
        ),
        ("responses", RESPONSES_SCHEMA, _response_rows(paths, variant, prompt_set, unreadable)),
    ):
        target = paths.parquet_file(variant, table, prompt_set)
        out[table] = (target, _write_table(target, schema, rows))
    return out

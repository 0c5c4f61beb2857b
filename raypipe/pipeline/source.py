"""The job's first stage: the prompt set read by Ray Data and cut down to the work left.

The driver checked every item (load_prompt_set) and decided, per prompt id, what is left to
do (plan.Work). Here Ray Data reads the set itself: a JSON Lines file in byte ranges cut at
line ends, a Parquet file by Ray's own reader, a .json set (SPEC 3: one JSON document) by one
read task that gives its items out a block at a time, in the set's order; each block's items
are put in the stages' shape, and the prompts with nothing left are dropped there, in the
workers: the driver holds the ids, never the rows.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from raypipe.store.prompts import PromptItem, PromptSet, normalize_item, parse_line

ROW_COLUMNS = ("prompt_set", "prompt_id", "text", "system_prompt", "note", "generate", "project")
JSONL_CHUNK = 4 << 20  # bytes of a JSON Lines set per read task
# Reading is light: a read task must fit beside a model server that holds the node's CPUs.
READ_ARGS = {"num_cpus": 0.1}
JSON_BLOCK = 4096  # items of a .json set per block its read task gives out
ITEM_COLUMNS = ("id", "text", "system_prompt", "note")


def _line_starts(path: Path, chunk: int) -> list[int]:
    """Byte offsets that cut the file into ranges of about `chunk` bytes, each starting at a
    line's first byte: one seek and one partial line read per range, not a scan."""
    size = path.stat().st_size
    starts = [0]
    with path.open("rb") as f:
        pos = chunk
        while pos < size:
            f.seek(pos - 1)
            f.readline()  # to the end of the line that holds byte pos - 1
            pos = f.tell()
            if pos >= size:
                break
            if pos > starts[-1]:
                starts.append(pos)
            pos += chunk
    return starts


def _read_lines(path: str, start: int, end: int):
    """The lines that begin in [start, end), with the byte offset of each (the driver checked
    every line by number already; an offset names a line as well, should the file change)."""
    with open(path, "rb") as f:
        f.seek(start)
        lines = f.read(end - start).split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    offsets, at = [], start
    for line in lines:
        offsets.append(at)
        at += len(line) + 1
    yield pa.table({"line": pa.array(lines, pa.binary()), "at": pa.array(offsets, pa.int64())})


def _jsonl_dataset(path: Path):
    import ray
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    starts = _line_starts(path, JSONL_CHUNK)
    size = path.stat().st_size
    ranges = list(zip(starts, [*starts[1:], size], strict=True))

    class JsonLines(Datasource):
        def estimate_inmemory_data_size(self):
            return size

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            return [
                ReadTask(
                    lambda a=a, b=b: _read_lines(str(path), a, b),
                    BlockMetadata(None, b - a, [str(path)], None),
                    per_task_row_limit=per_task_row_limit,
                )
                for a, b in ranges
            ]

    return ray.data.read_datasource(JsonLines(), **READ_ARGS)


def _read_json_items(prompts: PromptSet, block_size: int):
    """A .json set's items, normalized, a block at a time (the document is read as text and
    its items one by one: see store.prompts)."""
    cols: dict[str, list] = {c: [] for c in ITEM_COLUMNS}

    def block() -> pa.Table:
        return pa.table({c: pa.array(cols[c], pa.string()) for c in ITEM_COLUMNS})

    for item in prompts.iter_items():
        for c in ITEM_COLUMNS:
            cols[c].append(getattr(item, c))
        if len(cols["id"]) >= block_size:
            yield block()
            cols = {c: [] for c in ITEM_COLUMNS}
    if cols["id"]:
        yield block()


def _json_dataset(prompts: PromptSet):
    import ray
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    size = prompts.path.stat().st_size

    class JsonDocument(Datasource):
        def estimate_inmemory_data_size(self):
            return size

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            meta = BlockMetadata(len(prompts.ids), size, [str(prompts.path)], None)
            read = lambda n=JSON_BLOCK: _read_json_items(prompts, n)  # noqa: E731
            return [ReadTask(read, meta, per_task_row_limit=per_task_row_limit)]

    return ray.data.read_datasource(JsonDocument(), **READ_ARGS)


def prompt_dataset(prompts: PromptSet, generate: frozenset[str], project: frozenset[str]):
    """The rows of the set that have work left, in the stages' columns (ROW_COLUMNS)."""
    import ray

    kind = prompts.path.suffix
    if kind == ".jsonl":
        ds = _jsonl_dataset(prompts.path)
    elif kind == ".parquet":
        ds = ray.data.read_parquet(str(prompts.path), **READ_ARGS)
    else:
        ds = _json_dataset(prompts)
    kwargs = dict(
        kind=kind,
        path=str(prompts.path),
        name=prompts.name,
        system_prompt=prompts.system_prompt,
        generate=generate,
        project=project,
    )
    return ds.map_batches(
        select_rows, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=None, num_cpus=0.1
    )


def _items(batch: pa.Table, kind: str, path: Path, system_prompt):
    if kind == ".jsonl":
        for line, at in zip(batch.column("line").to_pylist(), batch.column("at").to_pylist()):
            raw = parse_line(path, f"line at byte {at}", line)
            if raw is not None:
                yield normalize_item(raw, path, f"line at byte {at}", system_prompt)
    elif kind == ".json":  # normalized by its read task
        for row in batch.to_pylist():
            yield PromptItem(**row)
    else:
        for raw in batch.to_pylist():
            yield normalize_item(raw, path, "row", system_prompt)


def select_rows(
    batch: pa.Table,
    kind: str,
    path: str,
    name: str,
    system_prompt: str | None,
    generate: frozenset[str],
    project: frozenset[str],
) -> pa.Table:
    cols: dict[str, list] = {c: [] for c in ROW_COLUMNS}
    for item in _items(batch, kind, Path(path), system_prompt):
        gen, proj = item.id in generate, item.id in project
        if not (gen or proj):
            continue
        for c, v in zip(
            ROW_COLUMNS,
            (name, item.id, item.text, item.system_prompt, item.note, gen, proj),
            strict=True,
        ):
            cols[c].append(v)
    types = [pa.string()] * 5 + [pa.bool_()] * 2
    return pa.table({c: pa.array(cols[c], t) for c, t in zip(ROW_COLUMNS, types, strict=True)})

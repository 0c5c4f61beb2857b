"""The job's source: prompt sets read by Ray Data in parts, cut to the work the plan left."""

from __future__ import annotations

import dataclasses
import json
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypipe.pipeline import source
from raypipe.pipeline.source import ROW_COLUMNS, _line_starts, _read_lines, prompt_dataset
from raypipe.store.prompts import PromptSet, load_prompt_set

# Line ends inside the text that str.splitlines would cut at, a CRLF line, blank lines.
ITEMS = [
    {"id": 0, "text": "first\u2028still the first", "note": "n"},
    {"id": "b", "prompt": "by prompt", "system_prompt": "be brief"},
    *({"id": f"p{i}", "text": f"prompt number {i} " + "x" * (i % 7)} for i in range(40)),
    {"id": "last", "text": "a\u0085b\x1cc"},
]


def _write_jsonl(folder, name="set", crlf_at=3):
    path = folder / "inference" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(item, ensure_ascii=False) for item in ITEMS]
    lines[crlf_at] += "\r"
    lines.insert(5, "")
    lines.insert(9, "   ")
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return path


def test_line_ranges_cover_every_line_once(tmp_path):
    path = _write_jsonl(tmp_path)
    data = path.read_bytes()
    for chunk in (1, 7, 64, 300, len(data), 10 * len(data)):
        starts = _line_starts(path, chunk)
        assert starts[0] == 0 and starts == sorted(set(starts))
        # Every range starts at a line's first byte...
        assert all(data[s - 1 : s] == b"\n" for s in starts[1:])
        ends = [*starts[1:], len(data)]
        got = []
        for a, b in zip(starts, ends, strict=True):
            (block,) = _read_lines(str(path), a, b)
            got += block.column("line").to_pylist()
            # Each line's offset is where it begins in the file.
            for line, at in zip(block.column("line").to_pylist(), block.column("at").to_pylist()):
                assert data[at : at + len(line)] == line and (at == 0 or data[at - 1] == 10)
        # ...and together they hold the file's lines, each once, in order.
        assert got == data.split(b"\n")[:-1], chunk


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet"])
def test_the_dataset_holds_the_work_left_and_nothing_else(tmp_path, ray_session, fmt, monkeypatch):
    datasets = tmp_path
    if fmt == "jsonl":
        _write_jsonl(datasets)
        monkeypatch.setattr(source, "JSONL_CHUNK", 200)  # several read tasks
    elif fmt == "json":
        path = datasets / "inference" / "set.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"system_prompt": "set level", "prompts": ITEMS}))
        monkeypatch.setattr(source, "JSON_BLOCK", 5)  # several blocks
    else:
        path = datasets / "inference" / "set.parquet"
        path.parent.mkdir(parents=True)
        items = [{**i, "id": str(i["id"])} for i in ITEMS]
        cols = sorted({k for i in items for k in i})
        table = pa.table({c: [i.get(c) for i in items] for c in cols})
        pq.write_table(table, path, row_group_size=8)  # several row groups
    prompts = load_prompt_set(datasets, "set")
    want = {item.id: item for item in prompts.items}
    generate = frozenset(["b", "p3", "last"])
    project = frozenset(["0", "b", "p3", "p39", "last"])
    # Every format is read in the workers: the driver never goes through the items.
    monkeypatch.setattr(PromptSet, "iter_items", _not_in_the_driver)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = prompt_dataset(prompts, generate, project)
    # Ray's read arguments as Ray 2.60 names them (ray_remote_args goes in 2.64).
    assert not [str(w.message) for w in caught if "ray_remote_args" in str(w.message)]
    rows = ds.take_all()
    assert sorted(r["prompt_id"] for r in rows) == sorted(generate | project)
    for r in rows:
        assert set(r) == set(ROW_COLUMNS)
        item = want[r["prompt_id"]]
        assert (r["text"], r["system_prompt"], r["note"]) == (
            item.text,
            item.system_prompt,
            item.note,
        )
        assert r["prompt_set"] == "set"
        assert (r["generate"], r["project"]) == (item.id in generate, item.id in project)
    assert want["0"].text == "first\u2028still the first"


def _not_in_the_driver(self):
    raise AssertionError(f"the driver read the items of {self.path}")


def test_a_set_with_nothing_left_gives_no_rows(tmp_path, ray_session):
    _write_jsonl(tmp_path)
    prompts = load_prompt_set(tmp_path, "set")
    assert prompt_dataset(prompts, frozenset(), frozenset()).count() == 0


def test_the_prompt_set_holds_ids_and_reads_items_again(tmp_path):
    _write_jsonl(tmp_path)
    prompts = load_prompt_set(tmp_path, "set")
    assert {f.name for f in dataclasses.fields(prompts)} == {"name", "path", "ids", "system_prompt"}
    assert prompts.ids[:3] == ("0", "b", "p0") and len(prompts.ids) == len(ITEMS)
    assert [i.id for i in prompts.iter_items()] == list(prompts.ids)


def _plan(root, *extra):
    from raypipe.cli import build_parser, infer_options
    from raypipe.pipeline.plan import plan_infer

    args = ["infer", "--root", str(root), "--experiment", "tiny", "--prompt-set", "tests/small"]
    return plan_infer(infer_options(build_parser().parse_args([*args, *extra])))


def test_resume_asks_the_tables_not_each_file(tiny_root, ray_session, monkeypatch):
    """After a run, what is left comes from a listing per folder and the projections table:
    no projection file is opened. Files the table does not know (a tree written elsewhere)
    are read; a file deleted is missing though the table still holds its rows."""
    from raypipe.pipeline import plan as plan_module
    from tests.conftest import PROMPTS, infer

    assert infer(tiny_root) == 0
    opened = []
    real = plan_module.projection_contents
    monkeypatch.setattr(
        plan_module, "projection_contents", lambda path: opened.append(path) or real(path)
    )
    plan = _plan(tiny_root)
    assert opened == [] and plan.generate == frozenset() and plan.project == frozenset()
    assert all(m == () for m in plan.missing.values())

    inference = tiny_root / "experiments" / "tiny" / "inference" / "base"
    gone = next((inference / "projections").rglob("*.json"))
    trait = gone.parent.relative_to(inference / "projections").parent.parent.as_posix()
    gone.unlink()
    plan = _plan(tiny_root)
    assert plan.missing[trait] == (gone.stem,) and plan.project == {gone.stem}
    assert opened == []

    for table in (inference / "parquet").rglob("*.parquet"):
        table.unlink()  # as a tree trait-interp wrote: files, no tables
    plan = _plan(tiny_root)
    assert len(opened) == 2 * len(PROMPTS) - 1  # every file there is, read once
    assert plan.missing[trait] == (gone.stem,) and plan.project == {gone.stem}

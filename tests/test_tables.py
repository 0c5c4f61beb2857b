"""Parquet tables written by the workers as a run goes (parts), folded in by compaction; and
runs with `--json none`, where the tables alone record what exists."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from raypipe.store import parquet
from raypipe.store.paths import ExperimentPaths
from tests.conftest import PROMPTS, TRAITS, infer

V, SET = "base", "tests/small"


def _row(pid: str, trait: str, layer: int, value: float, method: str = "probe") -> dict:
    return {
        "prompt_set": SET,
        "prompt_id": pid,
        "trait": trait,
        "method": method,
        "layer": layer,
        "component": "residual",
        "position": "response[:]",
        "selection_source": "layers_arg",
        "baseline": 0.0,
        "centered": False,
        "n_prompt_tokens": 1,
        "n_response_tokens": 1,
        "prompt_scores": [value],
        "response_scores": [value],
        "prompt_norms": [1.0],
        "response_norms": [1.0],
        "normalized_prompt": [value],
        "normalized_response": [value],
    }


def _table(paths) -> list[tuple]:
    t = pq.read_table(paths.parquet_file(V, "projections", SET)).to_pylist()
    return sorted((r["prompt_id"], r["trait"], r["layer"], r["prompt_scores"][0]) for r in t)


def test_compaction_newest_wins_and_replacing_rows_clear_their_group(tmp_path):
    paths = ExperimentPaths(tmp_path, "e")
    a, b = "behavior/alpha", "tone/beta"
    parquet.write_part(
        paths, V, "projections", SET, [_row("0", a, 1, 1.0), _row("1", a, 1, 1.0)], [True, True]
    )
    parquet.compact(paths, V, SET)
    # A file rewritten whole (its rows replace), a merged-in entry (by key), another trait.
    parquet.write_part(
        paths, V, "projections", SET, [_row("0", a, 2, 2.0), _row("0", a, 3, 2.0)], [True, True]
    )
    parquet.write_part(paths, V, "projections", SET, [_row("1", a, 3, 3.0)], [False])
    parquet.write_part(paths, V, "projections", SET, [_row("1", b, 1, 4.0)], [True])
    assert parquet.current(paths, V, "projections", SET).num_rows == 5  # as compaction will
    tables = parquet.compact(paths, V, SET)
    want = [
        ("0", a, 2, 2.0),
        ("0", a, 3, 2.0),
        ("1", a, 1, 1.0),
        ("1", a, 3, 3.0),
        ("1", b, 1, 4.0),
    ]
    assert _table(paths) == want and tables["projections"][1] == 5
    assert not paths.parquet_parts(V, "projections", SET).exists()  # folded in, gone
    # Killed after the new table landed but before its parts went: folded again, same table.
    part = parquet.write_part(paths, V, "projections", SET, [_row("1", a, 3, 3.0)], [False])
    keep = part.read_bytes()
    parquet.compact(paths, V, SET)
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(keep)
    parquet.compact(paths, V, SET)
    assert _table(paths) == want
    # A part half-written by a killed writer is a temp file, never read as a part.
    parts = paths.parquet_parts(V, "projections", SET)
    parts.mkdir(parents=True, exist_ok=True)
    (parts / ".x.part.tmp-host-1-abc").write_bytes(b"PAR1 torn")
    parquet.compact(paths, V, SET)
    assert _table(paths) == want


def test_a_run_streams_its_rows_and_never_reads_the_json_back(ray_session, tiny_root):
    """The tables come from the rows the workers wrote, not from the JSON files: a response
    file edited after the run leaves the table as the run wrote it."""
    assert infer(tiny_root, "--layers", "1,2") == 0
    paths = ExperimentPaths(tiny_root, "tiny")
    responses = pq.read_table(paths.parquet_file(V, "responses", SET)).to_pylist()
    assert len(responses) == len(PROMPTS)
    assert pq.read_table(paths.parquet_file(V, "projections", SET)).num_rows == 2 * 2 * 10
    first = paths.response_file(V, SET, "0")
    edited = {**json.loads(first.read_text()), "response": "edited by hand"}
    first.write_text(json.dumps(edited))
    assert infer(tiny_root, "--layers", "1,2") == 0  # nothing to do
    again = {
        r["prompt_id"]: r
        for r in pq.read_table(paths.parquet_file(V, "responses", SET)).to_pylist()
    }
    assert again["0"]["response"] != "edited by hand"
    assert again["0"]["token_ids"] == {r["prompt_id"]: r for r in responses}["0"]["token_ids"]


def test_json_none_writes_the_tables_only_and_resumes_from_them(
    ray_session, tiny_root, tmp_path_factory
):
    """--json none: no per-prompt file, the same table rows as a JSON run; a re-run finds
    everything done in the tables; new layers go in beside the old ones; --regenerate
    replaces a prompt's rows."""
    import shutil

    ref = tmp_path_factory.mktemp("ref")
    for part in ("experiments", "datasets"):
        shutil.copytree(tiny_root / part, ref / part)
    assert infer(ref, "--layers", "1,2") == 0
    assert infer(tiny_root, "--layers", "1,2", "--json", "none") == 0
    out = tiny_root / "experiments/tiny/inference/base"
    assert not list(out.glob("responses/**/*.json")) and not list(out.glob("projections/**/*.json"))
    paths, ref_paths = ExperimentPaths(tiny_root, "tiny"), ExperimentPaths(ref, "tiny")

    def rows(p, table="projections"):
        t = pq.read_table(p.parquet_file(V, table, SET)).to_pylist()
        key = (
            (lambda r: (r["prompt_id"], r["trait"], r["layer"]))
            if table == "projections"
            else (lambda r: r["prompt_id"])
        )
        return {key(r): r for r in t}

    got, want = rows(paths), rows(ref_paths)
    assert got.keys() == want.keys() and len(got) == 2 * 2 * len(PROMPTS)
    for k, r in want.items():
        np.testing.assert_array_equal(got[k]["response_scores"], r["response_scores"])
    assert {k: r["token_ids"] for k, r in rows(paths, "responses").items()} == {
        k: r["token_ids"] for k, r in rows(ref_paths, "responses").items()
    }
    before = rows(paths)
    assert infer(tiny_root, "--layers", "1,2", "--json", "none", quiet=False) == 0
    assert rows(paths) == before  # done in the tables: nothing redone
    assert infer(tiny_root, "--layers", "3", "--json", "none") == 0
    layers = {(pid, trait): set() for pid, trait, _ in before}
    for pid, trait, layer in rows(paths):
        layers[(pid, trait)].add(layer)
    assert all(v == {1, 2, 3} for v in layers.values()), layers
    assert infer(tiny_root, "--layers", "1", "--json", "none", "--regenerate") == 0
    assert {layer for _, _, layer in rows(paths)} == {1}  # old entries belonged to old tokens
    assert len(rows(paths)) == len(TRAITS) * len(PROMPTS)


@pytest.mark.parametrize("flag", ["--json=some", "--json="])
def test_json_takes_all_or_none(tiny_root, flag, capsys):
    with pytest.raises(SystemExit):
        infer(tiny_root, flag)
    assert "--json" in capsys.readouterr().err


def test_status_reads_a_tables_only_set_from_its_tables(ray_session, tiny_root, capsys):
    from raypipe.cli import main

    assert infer(tiny_root, "--layers", "1,2", "--json", "none") == 0
    capsys.readouterr()
    args = ["status", "--root", str(tiny_root), "--experiment", "tiny", "--prompt-set", SET]
    assert main([*args, "--layers", "1,2", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["responses"]["missing"] == 0
    assert all(t["missing"] == 0 for t in st["projections"].values())
    assert main([*args, "--layers", "3", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert all(t["missing"] == len(PROMPTS) for t in st["projections"].values())


def _fold_case(paths, parts: list[tuple[list[dict], list[bool]]], old: list[dict] | None):
    """Writes `old` as the table (compacted), then `parts`: returns the part files."""
    if old:
        parquet.write_part(paths, V, "projections", SET, old, [True] * len(old))
        parquet.compact(paths, V, SET)
    return [parquet.write_part(paths, V, "projections", SET, r, f) for r, f in parts]


FOLD_CASES = {
    # A fresh run: every prompt in one part.
    "fresh": ([([_row("0", "t/a", 1, 1.0)], [True]), ([_row("1", "t/a", 1, 2.0)], [True])], None),
    # A resume: the old table loses the rows the parts replace, keeps the rest.
    "resume": (
        [([_row("0", "t/a", 2, 5.0)], [True]), ([_row("2", "t/a", 1, 6.0)], [False])],
        [_row("0", "t/a", 1, 1.0), _row("1", "t/a", 1, 1.0), _row("2", "t/a", 1, 1.0)],
    ),
    # A batch Ray retried: the same prompt in two parts (the later one wins).
    "retried": (
        [([_row("0", "t/a", 1, 1.0)], [True]), ([_row("0", "t/a", 1, 9.0)], [True])],
        None,
    ),
    # A later part replaces a prompt's whole trait that an earlier part wrote.
    "replaced": (
        [
            ([_row("0", "t/a", 1, 1.0), _row("0", "t/a", 2, 1.0)], [True, True]),
            ([_row("0", "t/a", 2, 3.0)], [True]),
        ],
        None,
    ),
}


@pytest.mark.parametrize("case", sorted(FOLD_CASES))
def test_folding_as_the_run_goes_gives_the_table_compaction_gives(tmp_path, case):
    """TableFold appends parts while a run writes them, and its finished table is compaction's
    exactly, in every case: where appending cannot be exact (a prompt in two parts) it falls
    back to the whole compaction, whose parts were never deleted before."""
    parts, old = FOLD_CASES[case]
    ref, got = ExperimentPaths(tmp_path / "ref", "e"), ExperimentPaths(tmp_path / "got", "e")
    _fold_case(ref, parts, old)
    want = parquet.compact(ref, V, SET)["projections"][1]
    fold = parquet.TableFold(got, V, SET, "projections")
    written = []
    for rows, flags in parts:  # folded one part at a time, as the driver does
        if old and not written:
            _fold_case(got, [], old)
        written.append(parquet.write_part(got, V, "projections", SET, rows, flags))
        assert fold.step() == 1
    path, count = fold.finish()
    assert (count, _table(got)) == (want, _table(ref))
    assert path == got.parquet_file(V, "projections", SET)
    assert not any(p.exists() for p in written)  # folded in, gone
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


def test_a_fold_given_up_leaves_the_parts_and_the_old_table(tmp_path):
    """A run that fails: its temp table goes, the old table and the parts stay for the next
    run's compaction."""
    paths = ExperimentPaths(tmp_path, "e")
    parts, old = FOLD_CASES["resume"]
    written = _fold_case(paths, parts, old)
    before = pq.read_table(paths.parquet_file(V, "projections", SET)).num_rows
    fold = parquet.TableFold(paths, V, SET, "projections")
    assert fold.step() == 2
    fold.abandon()
    target = paths.parquet_file(V, "projections", SET)
    assert pq.read_table(target).num_rows == before and all(p.exists() for p in written)
    assert not [p for p in target.parent.iterdir() if ".tmp-" in p.name]
    parquet.compact(paths, V, SET)
    # The old table's prompt 0 goes whole (its part replaces the trait), prompt 2's row by key.
    assert _table(paths) == [("0", "t/a", 2, 5.0), ("1", "t/a", 1, 1.0), ("2", "t/a", 1, 6.0)]

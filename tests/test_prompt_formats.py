"""Prompt sets as JSON (SPEC 3), JSON Lines or Parquet: the same items, the same checks."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypipe.errors import InputError
from raypipe.store.prompts import load_prompt_set

ITEMS = [
    {"id": 0, "text": "hello there", "note": "first"},
    {"id": "b", "prompt": "use the prompt key", "system_prompt": "be brief"},
    {"id": 2, "text": "x" * 50, "extra": "kept and ignored"},
]


def _write(tmp_path, name: str, fmt: str, items) -> None:
    folder = tmp_path / "inference"
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps({"name": name, "prompts": items}))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(i) + "\n" for i in items))
    else:
        cols = sorted({k for i in items for k in i})
        pq.write_table(pa.table({c: [i.get(c) for i in items] for c in cols}), path)


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_the_three_formats_give_the_same_items(tmp_path, fmt):
    _write(tmp_path, "ref", "json", ITEMS)
    _write(tmp_path, "other", fmt, [{**i, "id": str(i["id"])} for i in ITEMS])
    assert load_prompt_set(tmp_path, "other").items == load_prompt_set(tmp_path, "ref").items


@pytest.mark.parametrize(
    "fmt, items, field, message",
    [
        ("jsonl", [ITEMS[0], {**ITEMS[2], "id": 0}], "line 2.id", "duplicate id '0'"),
        ("jsonl", [ITEMS[0], {"id": "a\n", "text": "x"}], "line 2.id", "not a safe name"),
        ("jsonl", [{"id": 1, "text": "\ud800"}], "line 1.text", "lone surrogate"),
        ("parquet", [{"id": "1", "text": None}], "row 0.text", "must be a string"),
        ("parquet", [{"text": "no id column"}], "row 0.id", "missing"),
        ("parquet", [{"id": "1", "note": "neither text nor prompt"}], "row 0.text", "missing"),
    ],
)
def test_bad_items_name_the_line_or_row(tmp_path, fmt, items, field, message):
    _write(tmp_path, "bad", fmt, items)  # json.dumps escapes a lone surrogate: \\ud800
    with pytest.raises(InputError) as err:
        load_prompt_set(tmp_path, "bad")
    assert err.value.field == field and message in err.value.message, str(err.value)


def test_a_malformed_line_a_non_parquet_file_and_two_formats_at_once(tmp_path):
    folder = tmp_path / "inference"
    folder.mkdir()
    (folder / "torn.jsonl").write_text('{"id": 1, "text": "ok"}\n{"id": 2, "te\n')
    with pytest.raises(InputError, match=r"torn\.jsonl: line 2: malformed JSON"):
        load_prompt_set(tmp_path, "torn")
    (folder / "fake.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match=r"fake\.parquet: prompt_set: not a readable Parquet"):
        load_prompt_set(tmp_path, "fake")
    _write(tmp_path, "both", "json", ITEMS)
    _write(tmp_path, "both", "jsonl", ITEMS)
    with pytest.raises(InputError, match="ambiguous: both.json, both.jsonl"):
        load_prompt_set(tmp_path, "both")

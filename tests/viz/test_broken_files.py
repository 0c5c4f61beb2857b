"""Hostile per-file data (responses, projections, config, Parquet) never gives HTTP 500.

Found by fuzzing the fixture tree: each case damages one file the way a hostile or careless
writer could and asks the real server. A value the page only displays comes back null; data
the view needs is a 422 naming the file and field; a listing keeps its other items.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raypipe.viz.server import make_server
from tests.viz.fixture_tree import write_fixture_tree
from tests.viz.test_browser import CHROMIUM, CHROMIUM_ARGS, _no_browser
from tests.viz.viz_http import get_json

PS = "starter_prompts/general"
Q = f"experiment=demo&variant=instruct&prompt_set={quote(PS, safe='')}"
PAIR = f"experiment=demo&prompt_set={quote(PS, safe='')}&variant_a=instruct&variant_b=lora"
JOY = "trait=emotion%2Fjoy"
V = "experiments/demo/inference/instruct"
RESPONSE = f"{V}/responses/{PS}/0.json"
PROJECTION = f"{V}/projections/emotion/joy/{PS}/0.json"
PROJ_TABLE = f"{V}/parquet/projections/{PS}.parquet"
RESP_TABLE = f"{V}/parquet/responses/{PS}.parquet"


@pytest.fixture()
def site(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A fresh fixture tree the test may damage, with its own server."""
    root = tmp_path / "root"
    write_fixture_tree(root)
    srv = make_server(root, "127.0.0.1", 0, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield {"root": root, "base": srv.url.rstrip("/")}
    srv.shutdown()
    srv.server_close()


def _edit(root: Path, rel: str, change) -> None:
    """Apply `change` to a JSON file and write it back with NaN and Infinity allowed."""
    path = root / rel
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _get(site: dict[str, Any], path: str) -> tuple[int, Any]:
    status, body = get_json(site["base"] + path)
    assert status < 500, (path, body)
    return status, body


def _no_parquet(root: Path) -> None:
    for variant in ("instruct", "lora"):
        shutil.rmtree(root / "experiments/demo/inference" / variant / "parquet")


# -- values the page only shows: null when they are not what they should be -----------------


def test_non_finite_and_odd_display_fields_come_back_null(site) -> None:
    root = site["root"]
    nan, inf = float("nan"), float("inf")

    def response(d: dict) -> None:
        d.update(
            prompt=nan,
            response=inf,
            system_prompt=[nan],
            inference_model={"x": -inf},
            prompt_note=nan,
            capture_date=[1, 2],
            tags=[nan, "kept", {"a": 1}],
        )

    def projection(d: dict) -> None:
        d["metadata"].update(component=nan, position=[nan], centered=nan)
        e = d["projections"][0]
        e.update(baseline=nan, selection_source=inf, method="probe")
        e["cleaned"]["dims"] = [nan, 12]

    def config(d: dict) -> None:
        d["model_variants"]["instruct"]["model"] = nan
        d["model_variants"]["lora"]["lora"] = [inf]

    _edit(root, RESPONSE, response)
    _edit(root, PROJECTION, projection)
    _edit(root, "experiments/demo/config.json", config)

    status, body = _get(site, "/api/variants?experiment=demo")
    assert status == 200
    by_name = {v["name"]: v for v in body["variants"]}
    assert by_name["instruct"]["model"] is None and by_name["lora"]["lora"] is None
    status, body = _get(site, f"/api/traits?{Q}")
    assert status == 200
    joy = next(t for t in body["traits"] if t["trait"] == "emotion/joy")
    assert joy["component"] is None and joy["layers"] == [12, 16]

    status, body = _get(site, f"/api/prompt?{Q}&prompt_id=0&centered=1")
    assert status == 200
    r = body["response"]
    assert [r[k] for k in ("prompt", "response", "system_prompt", "inference_model")] == [None] * 4
    assert r["prompt_note"] is None and r["capture_date"] is None and r["tags"] == ["kept"]
    joy = next(t for t in body["traits"] if t["trait"] == "emotion/joy")
    assert joy["component"] is None and joy["position"] is None
    assert joy["centered_at_source"] is False  # NaN is not "already centered"
    first = joy["series"][0]
    assert first["baseline"] is None and first["selection_source"] is None
    assert first["cleaned_dims"] is None
    assert set(first["response"]) == {None}  # centered on a NaN baseline: no number is right

    status, body = _get(site, f"/api/compare_prompt?{PAIR}&{JOY}&prompt_id=0")
    assert status == 200 and body["response_a"] is None


@pytest.mark.parametrize(
    "cleaned", [True, 5, "x", [1, 2], None, {"prompt": [1.0]}], ids=lambda v: json.dumps(v)
)
def test_odd_cleaned_block(site, cleaned) -> None:
    _edit(site["root"], PROJECTION, lambda d: d["projections"][0].update(cleaned=cleaned))
    status, body = _get(site, f"/api/prompt?{Q}&prompt_id=0")
    assert status == 200
    joy = next(t for t in body["traits"] if t["trait"] == "emotion/joy")
    assert joy["series"][0]["cleaned_dims"] is None
    status, body = _get(site, f"/api/prompt?{Q}&prompt_id=0&cleaned=1")
    assert status == 422 and body["error"].startswith(f"{PROJECTION}: projections[0].cleaned")


# -- data a view needs: 422 naming the file and field ------------------------------------------

BAD_SCORES = [None, 5, "x", ["x"], [[1.0, 2.0]], {"a": 1}, True]


@pytest.mark.parametrize("value", BAD_SCORES, ids=lambda v: json.dumps(v))
@pytest.mark.parametrize("field", ["prompt", "response"])
def test_scores_that_are_not_a_list_of_numbers(site, field: str, value) -> None:
    root = site["root"]
    _edit(root, PROJECTION, lambda d: d["projections"][0].update({field: value}))
    _no_parquet(root)  # so Model Analysis reads the JSON files too
    want = f"{PROJECTION}: projections[0].{field}: must be a list of numbers"
    for path in (
        f"/api/prompt?{Q}&prompt_id=0",
        f"/api/compare?{PAIR}&{JOY}&layer=12",
        f"/api/compare_prompt?{PAIR}&{JOY}&layer=12&prompt_id=0",
    ):
        status, body = _get(site, path)
        assert status == 422 and body["error"].startswith(want), (path, body)


@pytest.mark.parametrize(
    ("change", "field", "query"),
    [
        (lambda e: e.update(token_norms=5), "projections[0].token_norms", "mode=cosine"),
        (lambda e: e.pop("token_norms"), "projections[0].token_norms", "mode=cosine"),
        (lambda e: e["token_norms"].update(prompt=[[1]]), "token_norms.prompt", "mode=cosine"),
        (lambda e: e.update(baseline="x"), "projections[0].baseline", "centered=1"),
        (lambda e: e.update(baseline=None), "projections[0].baseline", "centered=1"),
        (lambda e: e.pop("baseline"), "projections[0].baseline", "centered=1"),
    ],
)
def test_other_bad_projection_fields(site, change, field: str, query: str) -> None:
    _edit(site["root"], PROJECTION, lambda d: change(d["projections"][0]))
    status, body = _get(site, f"/api/prompt?{Q}&prompt_id=0&{query}")
    assert status == 422 and body["error"].startswith(PROJECTION), body
    assert field in body["error"]


def test_stored_normalized_arrays_are_not_what_the_dashboard_shows(site) -> None:
    """Normalized scores come from the raw scores and norms (the store's one definition), as
    the overview's SQL computes them; the file's `normalized_*` arrays are for trait-interp's
    viewer, so damaged ones change nothing here."""
    root = site["root"]
    entry = json.loads((root / PROJECTION).read_text())["projections"][0]

    def damage(d: dict) -> None:
        d["projections"][0].update(normalized_prompt=7, normalized_response=["x"])

    _edit(root, PROJECTION, damage)
    status, body = _get(site, f"/api/prompt?{Q}&prompt_id=0&mode=normalized")
    assert status == 200
    joy = next(t for t in body["traits"] if t["trait"] == "emotion/joy")
    series = next(x for x in joy["series"] if x["layer"] == entry["layer"])
    for segment in ("prompt", "response"):
        norms = entry["token_norms"][segment]
        want = [s / (sum(norms) / len(norms)) for s in entry[segment]]
        assert series[segment] == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d.update(prompt_end=True), "prompt_end"),
        (lambda d: d.update(prompt_end=1.5), "prompt_end"),
        (lambda d: d.update(prompt_end=10**6), "prompt_end"),
        (lambda d: d.update(tokens=[None, "a"]), "tokens[0]"),
        (lambda d: d.update(tokens="abc"), "tokens"),
        (lambda d: d.clear(), "tokens"),
    ],
)
def test_bad_response_file(site, change, field: str) -> None:
    _edit(site["root"], RESPONSE, change)
    for path in (f"/api/prompt?{Q}&prompt_id=0", f"/api/compare_prompt?{PAIR}&{JOY}&prompt_id=0"):
        status, body = _get(site, path)
        assert status == 422 and body["error"].startswith(f"{RESPONSE}: {field}: "), body
    status, body = _get(site, f"/api/prompts?{Q}")
    assert status == 200 and len(body["prompts"]) == 5


# -- listings keep their other items, and nothing hangs ----------------------------------------


@pytest.mark.parametrize("kind", ["deep", "not json", "huge number"])
def test_one_broken_projection_does_not_hide_the_traits(site, kind: str) -> None:
    path = site["root"] / PROJECTION
    text = {"deep": "[" * 50_000 + "]" * 50_000, "not json": "{", "huge number": "9" * 5000}
    path.write_text(text[kind])
    status, body = _get(site, f"/api/traits?{Q}")
    assert status == 200
    by_trait = {t["trait"]: t for t in body["traits"]}
    assert set(by_trait) == {"emotion/joy", "safety/refusal", "persona/sycophancy"}
    assert by_trait["emotion/joy"]["error"].startswith(f"{PROJECTION}: ")
    assert by_trait["emotion/joy"]["layers"] == []
    assert by_trait["safety/refusal"]["layers"] == [12, 16]
    assert "error" not in by_trait["safety/refusal"]
    status, body = _get(site, f"/api/prompt?{Q}&prompt_id=0")
    assert status == 422 and body["error"].startswith(f"{PROJECTION}: ")
    status, body = _get(site, f"/api/prompt?{Q}&prompt_id=1")
    assert status == 200


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_a_projection_that_is_not_a_file_counts_as_not_written(site, kind: str) -> None:
    path = site["root"] / PROJECTION
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)  # opening it would block the request for good
    else:
        path.mkdir()
    status, body = _get(site, f"/api/traits?{Q}")
    assert status == 200
    joy = next(t for t in body["traits"] if t["trait"] == "emotion/joy")
    assert joy["layers"] == [12, 16] and "error" not in joy  # learnt from the next prompt
    status, body = _get(site, f"/api/prompt?{Q}&prompt_id=0")
    assert status == 200 and body["missing_traits"] == ["emotion/joy"]


@pytest.mark.parametrize("kind", ["deep", "fifo"])
def test_broken_config_is_reported_not_fatal(site, kind: str) -> None:
    path = site["root"] / "experiments/demo/config.json"
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.write_text("[" * 50_000 + "]" * 50_000)
    status, body = _get(site, "/api/experiments")
    assert status == 200
    assert body["experiments"][0]["error"].startswith("experiments/demo/config.json: file: ")


CONFIG = "experiments/demo/config.json"


def test_config_defaults_are_the_stores(site) -> None:
    """No `defaults` in config.json: the first variant the config declares (SPEC 2, as the
    CLI reads it), not the first folder name; one without outputs gives way to one with."""
    path = site["root"] / CONFIG
    variants = {"lora": {"model": "m", "lora": "adapters/x"}, "instruct": {"model": "m"}}
    path.write_text(json.dumps({"model_variants": variants}))
    status, body = _get(site, "/api/experiments")
    assert body["experiments"][0]["defaults"] == {"extraction": "lora", "application": "lora"}
    status, body = _get(site, "/api/variants?experiment=demo")
    assert body["defaults"] == {"extraction": "lora", "application": "lora"}
    assert body["config_warning"] is None
    assert {v["name"]: v["model"] for v in body["variants"]} == {"instruct": "m", "lora": "m"}
    variants = {"base": {"model": "b"}, **variants}  # declared first, never run
    path.write_text(json.dumps({"defaults": {"application": "lora"}, "model_variants": variants}))
    status, body = _get(site, "/api/variants?experiment=demo")
    assert body["defaults"] == {"extraction": "instruct", "application": "lora"}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda d: d["defaults"].update(application="nope"), "defaults.application"),
        (lambda d: d.update(model_variants=[]), "model_variants"),
        (lambda d: d["model_variants"]["lora"].update(model=""), "model_variants.lora.model"),
        (lambda d: d.update(use_chat_template="yes"), "use_chat_template"),
    ],
)
def test_config_the_store_refuses_is_a_warning(site, change, field: str) -> None:
    """The dashboard takes only defaults and model names from config.json: a field the store
    refuses is named, and the experiment's outputs are shown as if there were no config."""
    _edit(site["root"], CONFIG, change)
    status, body = _get(site, "/api/experiments")
    item = body["experiments"][0]
    assert status == 200 and "error" not in item
    assert item["config_warning"].startswith(f"{CONFIG}: {field}: ")
    assert item["defaults"] == {"extraction": "instruct", "application": "instruct"}
    status, body = _get(site, "/api/variants?experiment=demo")
    assert status == 200 and body["config_warning"] == item["config_warning"]
    assert [(v["model"], v["lora"]) for v in body["variants"]] == [(None, None)] * 2
    status, body = _get(site, f"/api/prompt?{Q}&prompt_id=0")
    assert status == 200


# -- Parquet tables with the wrong schema ------------------------------------------------------


def _retype(root: Path, rel: str, column: str, values: pa.Array | None) -> None:
    """Replace (or with None drop) one column of a Parquet table of the tree."""
    path = root / rel
    table = pq.read_table(path)
    if values is None:
        table = table.drop([column])
    else:
        table = table.set_column(table.column_names.index(column), column, values)
    pq.write_table(table, path)


def _like(n: int, kind: str) -> pa.Array:
    return {
        "string": pa.array(["x"] * n),
        "int": pa.array(range(n), pa.int64()),
        "double": pa.array([0.5] * n),
        "bool": pa.array([True] * n),
        "struct": pa.array([{"a": 1}] * n),
        "strings": pa.array([["a"]] * n),
        "nested": pa.array([[[1.0]]] * n),
    }[kind]


PROJECTION_COLUMNS = [
    ("trait", "int"),
    ("method", "double"),
    ("layer", "string"),
    ("layer", "double"),
    ("layer", "strings"),
    ("component", "struct"),
    ("prompt_id", "struct"),
    ("prompt_id", "strings"),
    ("baseline", "string"),
    ("centered", "string"),
    ("prompt_scores", "double"),
    ("response_scores", "strings"),
    ("response_norms", "nested"),
    ("response_scores", None),
    ("layer", None),
]


@pytest.mark.parametrize(("column", "kind"), PROJECTION_COLUMNS)
def test_projections_table_with_a_wrong_column(site, column: str, kind: str | None) -> None:
    root = site["root"]
    n = pq.read_metadata(root / PROJ_TABLE).num_rows
    _retype(root, PROJ_TABLE, column, None if kind is None else _like(n, kind))
    want = f"{PROJ_TABLE}: {column}: " + ("missing column" if kind is None else "must be ")
    for path in (f"/api/overview?{Q}", f"/api/compare?{PAIR}&{JOY}"):
        status, body = _get(site, path)
        unused = {"/api/overview": "prompt_scores", "/api/compare": "component"}
        if unused[path.split("?")[0]] == column:
            assert status == 200  # a column this view does not read
            continue
        assert status == 422 and body["error"].startswith(want), (path, body)


@pytest.mark.parametrize(
    ("column", "kind"),
    [("prompt_end", "string"), ("prompt_end", "strings"), ("tokens", "bool"), ("tokens", None)],
)
def test_responses_table_with_a_wrong_column(site, column: str, kind: str | None) -> None:
    root = site["root"]
    n = pq.read_metadata(root / RESP_TABLE).num_rows
    _retype(root, RESP_TABLE, column, None if kind is None else _like(n, kind))
    status, body = _get(site, f"/api/compare?{PAIR}&{JOY}")
    assert status == 422 and body["error"].startswith(f"{RESP_TABLE}: {column}: "), body


@pytest.mark.parametrize("kind", ["int", "double", "bool", "struct", "strings"])
def test_responses_table_with_odd_texts_keeps_the_prompt_list(site, kind: str) -> None:
    root = site["root"]
    _retype(root, RESP_TABLE, "response", _like(5, kind))
    status, body = _get(site, f"/api/prompts?{Q}")
    assert status == 200
    # Previews come from the response files instead, and the table's problem is named.
    assert body["prompts"][1]["preview"].startswith("I can't help")
    assert body["warnings"][0].startswith(f"{RESP_TABLE}: response: must be ")


def test_prompt_end_outside_the_tokens_in_parquet(site) -> None:
    root = site["root"]
    _retype(root, RESP_TABLE, "prompt_end", pa.array([10_000] * 5, pa.int32()))
    status, body = _get(site, f"/api/compare?{PAIR}&{JOY}")
    assert status == 422 and body["error"].startswith(f"{RESP_TABLE}: prompt_end: ")
    assert body["error"].endswith("got 10000 (prompt 0)")


def test_rows_without_keys_are_skipped_and_counted(site) -> None:
    root = site["root"]
    table = pq.read_table(root / PROJ_TABLE)
    layers = table.column("layer").to_pylist()
    traits = table.column("trait").to_pylist()
    layers[0], traits[1] = None, None
    table = table.set_column(
        table.column_names.index("layer"), "layer", pa.array(layers, pa.int32())
    )
    table = table.set_column(table.column_names.index("trait"), "trait", pa.array(traits))
    pq.write_table(table, root / PROJ_TABLE)
    status, body = _get(site, f"/api/overview?{Q}")
    assert status == 200
    assert sum(g["n"] + g["n_missing"] for g in body["groups"]) == table.num_rows - 2
    assert body["warnings"] == [
        f"{PROJ_TABLE}: 2 rows without trait, method, layer, component or prompt_id left out"
    ]


@pytest.mark.skipif(_no_browser() is not None, reason=str(_no_browser()))
def test_front_end_shows_file_problems(site) -> None:
    """In Chromium: each view names the broken file it worked around."""
    from playwright.sync_api import sync_playwright

    root, base = site["root"], site["base"]
    (root / PROJECTION).write_text("{")
    _retype(root, RESP_TABLE, "response", _like(5, "int"))
    table = pq.read_table(root / PROJ_TABLE)
    layers = table.column("layer").to_pylist()
    layers[-1] = None
    i = table.column_names.index("layer")
    pq.write_table(table.set_column(i, "layer", pa.array(layers, pa.int32())), root / PROJ_TABLE)
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as err:  # any launch failure means: cannot test here
            pytest.skip(f"Chromium did not start: {err}")
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))

            page.goto(f"{base}/#/dynamics?{Q}&prompt_id=1")
            page.wait_for_selector("#dyn-chart svg.chart")
            notes = page.locator("#view-dynamics .notes p").all_inner_texts()
            assert any(n.startswith(f"{RESP_TABLE}: response: must be ") for n in notes), notes

            page.goto(f"{base}/#/models?{PAIR}&trait=safety%2Frefusal")
            page.wait_for_selector("#cmp-chart svg.chart")
            options = page.locator("#cmp-trait option").all_inner_texts()
            assert sorted(options) == ["persona/sycophancy", "safety/refusal"]
            notes = page.locator("#cmp-notes p").all_inner_texts()
            assert len(notes) == 1 and notes[0].startswith(f"{PROJECTION}: line 1: "), notes

            page.goto(f"{base}/#/overview?{Q}")
            page.wait_for_selector("#ov-cards svg")
            notes = page.locator("#ov-notes p").all_inner_texts()
            keys = "trait, method, layer, component or prompt_id"
            assert notes == [
                f"{RESP_TABLE}: response: must be strings, not int64",  # so no previews
                f"{PROJ_TABLE}: 1 row without {keys} left out",
            ]
            assert errors == []
        finally:
            browser.close()


@pytest.mark.skipif(_no_browser() is not None, reason=str(_no_browser()))
def test_front_end_names_the_refused_config(site) -> None:
    """In Chromium: every view shows the experiment and names the config field it refused."""
    from playwright.sync_api import sync_playwright

    _edit(site["root"], CONFIG, lambda d: d["defaults"].update(application="nope"))
    want = f"{CONFIG}: defaults.application: names unknown variant 'nope'"
    base = site["base"]
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as err:  # any launch failure means: cannot test here
            pytest.skip(f"Chromium did not start: {err}")
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{base}/#/dynamics?experiment=demo")
            page.wait_for_selector("#dyn-chart svg.chart")
            assert page.locator("#dyn-variant").input_value() == "instruct"
            assert want in page.locator("#view-dynamics .notes p").all_inner_texts()
            page.goto(f"{base}/#/models?{PAIR}&{JOY}")
            page.wait_for_selector("#cmp-chart svg.chart")
            assert page.locator("#cmp-notes p").all_inner_texts() == [want]
            page.goto(f"{base}/#/overview?{Q}")
            page.wait_for_selector("#ov-cards svg")
            assert page.locator("#ov-notes p").all_inner_texts() == [want]
            assert errors == []
        finally:
            browser.close()

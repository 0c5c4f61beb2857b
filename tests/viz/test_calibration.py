"""A broken `calibration.json` turns cleaning off and says why; every other view still works.

Each case plants one kind of broken calibration for the `instruct` variant of the fixture tree
and asks every API route through the real HTTP server: each must answer as it does on the
healthy tree, and the variant listing and the prompt view must name the file and the field.
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

import pytest

from raypipe.store.calibration import massive_dims
from raypipe.viz.server import make_server
from tests.viz.fixture_tree import write_fixture_tree
from tests.viz.test_browser import CHROMIUM, CHROMIUM_ARGS, _no_browser
from tests.viz.viz_http import get_json

PS = quote("starter_prompts/general", safe="")
Q = f"experiment=demo&variant=instruct&prompt_set={PS}"
PAIR = f"experiment=demo&prompt_set={PS}&variant_a=instruct&variant_b=lora&trait=emotion%2Fjoy"
ROUTES = [
    "/api/experiments",
    "/api/variants?experiment=demo",
    "/api/prompt_sets?experiment=demo&variant=instruct",
    f"/api/prompts?{Q}",
    f"/api/traits?{Q}",
    f"/api/prompt?{Q}&prompt_id=0",
    f"/api/prompt?{Q}&prompt_id=2&mode=cosine&centered=1",
    f"/api/prompt?{Q}&prompt_id=2&cleaned=1",
    f"/api/compare?{PAIR}",
    f"/api/compare?{PAIR}&cleaned=1",
    f"/api/compare_prompt?{PAIR}&prompt_id=4&mode=normalized",
    f"/api/overview?{Q}&mode=cosine",
]
FILE = "experiments/demo/inference/instruct/massive_activations/calibration.json"
DEEP = b"[" * 100_000 + b"]" * 100_000


def _doc(dims: str) -> bytes:
    """A calibration file in the pipeline's shape with `dims` as its massive_dims text."""
    return f'{{"experiment": "demo", "aggregate": {{"massive_dims": {dims}}}}}'.encode()


# kind -> (bytes of calibration.json, the field its warning must name)
BROKEN: dict[str, tuple[bytes, str]] = {
    "not JSON": (b"{not json", "line 1"),
    "empty": (b"", "line 1"),
    "truncated": (_doc("[12, 400]")[:30], "line 1"),
    "a list": (b"[12, 400]", "calibration"),
    "a string": (b'"12, 400"', "calibration"),
    "null": (b"null", "calibration"),
    "NaN at top": (b"NaN", "calibration"),
    "no aggregate": (b'{"experiment": "demo"}', "aggregate"),
    "aggregate a list": (b'{"aggregate": [12, 400]}', "aggregate"),
    "aggregate a string": (b'{"aggregate": "12"}', "aggregate"),
    "aggregate null": (b'{"aggregate": null}', "aggregate"),
    "dims a number": (_doc("12"), "aggregate.massive_dims"),
    "dims a string": (_doc('"12, 400"'), "aggregate.massive_dims"),
    "dims an object": (_doc('{"12": true}'), "aggregate.massive_dims"),
    "dims null": (_doc("null"), "aggregate.massive_dims"),
    "dims true": (_doc("true"), "aggregate.massive_dims"),
    "float dim": (_doc("[12, 400.5]"), "aggregate.massive_dims[1]"),
    "integral float dim": (_doc("[12.0]"), "aggregate.massive_dims[0]"),
    "string dim": (_doc('["12"]'), "aggregate.massive_dims[0]"),
    "null dim": (_doc("[12, null]"), "aggregate.massive_dims[1]"),
    "boolean dim": (_doc("[true]"), "aggregate.massive_dims[0]"),
    "nested dim": (_doc("[[12]]"), "aggregate.massive_dims[0]"),
    "object dim": (_doc('[{"dim": 12}]'), "aggregate.massive_dims[0]"),
    "negative dim": (_doc("[12, -1]"), "aggregate.massive_dims[1]"),
    "huge dim": (_doc("[1000000000000000000000000000000]"), "aggregate.massive_dims[0]"),
    "infinite dim": (_doc("[1e400]"), "aggregate.massive_dims[0]"),
    "-Infinity dim": (_doc("[-Infinity]"), "aggregate.massive_dims[0]"),
    "NaN dim": (_doc("[NaN]"), "aggregate.massive_dims[0]"),
    "5000-digit dim": (_doc("[" + "9" * 5000 + "]"), "file"),
    "deeply nested": (DEEP, "file"),
    "deeply nested dims": (_doc("[" * 5000 + "]" * 5000), "file"),
    "non-UTF-8": (_doc("[12]").replace(b'"demo"', b'"d\xffmo"'), "file"),
    "UTF-16": (_doc("[12]").decode().encode("utf-16"), "file"),
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("viz-calibration")
    write_fixture_tree(root)
    srv = make_server(root, "127.0.0.1", 0, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    base = srv.url.rstrip("/")
    healthy = [get_json(base + r)[0] for r in ROUTES]
    assert healthy.count(200) == len(ROUTES) - 1  # cleaned compare: lora has no cleaned scores
    yield {"root": root, "base": base, "healthy": healthy, "good": (root / FILE).read_bytes()}
    srv.shutdown()
    srv.server_close()


@pytest.fixture()
def calibration(site: dict[str, Any]) -> Iterator[Path]:
    """The instruct variant's calibration path, put back as it was after the test."""
    path = site["root"] / FILE
    yield path
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.chmod(path, 0o644) if not path.is_symlink() else None
        path.unlink()
    path.write_bytes(site["good"])


def _check_reported(site: dict[str, Any], field: str) -> str:
    """Every route answers as on the healthy tree; the warning names the file and field."""
    base = site["base"]
    got = [get_json(base + r) for r in ROUTES]
    assert [s for s, _ in got] == site["healthy"], [
        (r, b) for r, (s, b) in zip(ROUTES, got, strict=True) if s >= 500
    ]
    variants = {v["name"]: v for v in got[1][1]["variants"]}
    instruct = variants["instruct"]
    assert instruct["has_calibration"] is False and instruct["massive_dims"] == []
    warning = instruct["calibration_warning"]
    assert isinstance(warning, str) and "\n" not in warning
    assert warning.startswith(f"{FILE}: {field}: "), warning
    assert variants["lora"]["calibration_warning"] is None
    for index in (5, 6, 7):
        body = got[index][1]
        assert body["calibration"] is None
        assert body["calibration_warning"] == warning
        assert any(w.startswith(warning) for w in body["warnings"]), body["warnings"]
    return warning


@pytest.mark.parametrize("kind", sorted(BROKEN))
def test_broken_calibration_file(site, calibration: Path, kind: str) -> None:
    content, field = BROKEN[kind]
    calibration.write_bytes(content)
    _check_reported(site, field)


def test_calibration_is_a_directory(site, calibration: Path) -> None:
    calibration.unlink()
    calibration.mkdir()
    assert "not a regular file" in _check_reported(site, "file")


def test_calibration_is_a_named_pipe(site, calibration: Path) -> None:
    # Opening a FIFO blocks until someone writes to it: it must not hang the server.
    calibration.unlink()
    os.mkfifo(calibration)
    assert "not a regular file" in _check_reported(site, "file")


def test_calibration_links_outside_the_tree(site, calibration: Path, tmp_path: Path) -> None:
    outside = tmp_path / "calibration.json"
    outside.write_bytes(site["good"])
    calibration.unlink()
    os.symlink(outside, calibration)
    assert "outside" in _check_reported(site, "file")


def test_calibration_is_a_dangling_link(site, calibration: Path) -> None:
    calibration.unlink()
    os.symlink(calibration.parent / "gone.json", calibration)
    _check_reported(site, "file")


def test_calibration_is_a_link_loop(site, calibration: Path) -> None:
    calibration.unlink()
    os.symlink(calibration, calibration)
    _check_reported(site, "file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_calibration_is_unreadable(site, calibration: Path) -> None:
    os.chmod(calibration, 0)
    assert "cannot read" in _check_reported(site, "file")


def test_healthy_and_trait_interp_calibrations_are_used(site, calibration: Path) -> None:
    base = site["base"]
    status, body = get_json(f"{base}/api/variants?experiment=demo")
    instruct = next(v for v in body["variants"] if v["name"] == "instruct")
    assert instruct["has_calibration"] and instruct["massive_dims"] == [12, 400]
    assert instruct["calibration_warning"] is None
    # trait-interp writes no massive_dims: the file is usable, with no flagged dims to list.
    calibration.write_bytes(b'{"aggregate": {"n_prompts": 5, "top_dims_by_layer": {"3": [7]}}}')
    status, body = get_json(f"{base}/api/variants?experiment=demo")
    instruct = next(v for v in body["variants"] if v["name"] == "instruct")
    assert instruct["has_calibration"] and instruct["calibration_warning"] is None
    status, body = get_json(f"{base}/api/prompt?{Q}&prompt_id=0")
    assert status == 200 and body["calibration"] == {"massive_dims": []}
    assert body["calibration_warning"] is None and body["warnings"] == []


def test_partial_calibration_offers_no_dims(site, calibration: Path) -> None:
    """A run still collecting (or stopped before it finished) marks the file partial: its
    dims are not the calibration's yet, so cleaning is off and the file says why."""
    record = {
        "experiment": "demo",
        "tokens_seen": 1234,
        "aggregate": {"n_prompts": 2, "massive_dims": [12, 400]},
        "complete": False,
    }
    calibration.write_text(json.dumps(record))
    warning = _check_reported(site, "complete")
    assert "partial (1234 tokens so far" in warning
    # The same file, complete: its dims are offered again.
    calibration.write_text(json.dumps({**record, "complete": True}))
    status, body = get_json(f"{site['base']}/api/variants?experiment=demo")
    instruct = next(v for v in body["variants"] if v["name"] == "instruct")
    assert instruct["has_calibration"] and instruct["massive_dims"] == [12, 400]


# trait-interp's calibration of a 6-layer model: it lists each layer's top dims, and no
# massive_dims. Dim 7 is in the top 5 of 4 layers, 3 of 3, 9 of 3 (once below the top 5).
TRAIT_INTERP = {
    "experiment": "demo",
    "model": "google/gemma-2-2b-it",
    "is_calibration": True,
    "aggregate": {
        "n_prompts": 50,
        "top_dims_by_layer": {
            "0": [7, 3, 1, 2, 5],
            "1": [7, 3, 9, 4, 6],
            "2": [7, 3, 9, 8, 11],
            "3": [7, 10, 12, 13, 14],
            "4": [15, 16, 17, 18, 19, 9],
            "5": [9, 20, 21, 22, 23],
        },
        "dim_magnitude_by_layer": {"7": [0.9, 0.8, 0.9, 0.7, 0.1, 0.1]},
        "layer_norms": {"0": 10.0},
    },
}


def test_trait_interp_calibration_gives_derived_dims(site, calibration: Path) -> None:
    """SPEC 8: a file without massive_dims is read, and the dims are derived from it: those
    trait-interp's viewer cleans by default (in the top 5 of at least 3 layers)."""
    calibration.write_text(json.dumps(TRAIT_INTERP))
    base = site["base"]
    status, body = get_json(f"{base}/api/variants?experiment=demo")
    instruct = next(v for v in body["variants"] if v["name"] == "instruct")
    assert instruct["has_calibration"] and instruct["calibration_warning"] is None
    assert instruct["massive_dims"] == [3, 7, 9]
    status, body = get_json(f"{base}/api/prompt?{Q}&prompt_id=0")
    assert status == 200 and body["calibration"] == {"massive_dims": [3, 7, 9]}
    # --remove-massive-dims reads the same dims through the same reader.
    assert massive_dims(calibration) == (3, 7, 9)


@pytest.mark.parametrize(
    ("aggregate", "field"),
    [
        ({"n_prompts": 5}, "aggregate"),
        ({"top_dims_by_layer": [[7]]}, "aggregate.top_dims_by_layer"),
        ({"top_dims_by_layer": {"3": "7"}}, "aggregate.top_dims_by_layer.3"),
        ({"top_dims_by_layer": {"3": [7, -1]}}, "aggregate.top_dims_by_layer.3[1]"),
    ],
)
def test_trait_interp_calibration_without_usable_top_dims(
    site, calibration: Path, aggregate: dict, field: str
) -> None:
    calibration.write_text(json.dumps({"aggregate": aggregate}))
    _check_reported(site, field)


@pytest.mark.skipif(_no_browser() is not None, reason=str(_no_browser()))
def test_front_end_names_the_broken_calibration(site, calibration: Path) -> None:
    """In Chromium: cleaning is off in both views, and each shows the file and field."""
    from playwright.sync_api import sync_playwright

    calibration.write_bytes(_doc('"12, 400"'))
    want = f"{FILE}: aggregate.massive_dims: must be a list of integers, not a string"
    base = site["base"]
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as err:  # any launch failure means: cannot test here
            pytest.skip(f"Chromium did not start: {err}")
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{base}/#/dynamics?{Q}&prompt_id=2")
            page.wait_for_selector("#dyn-chart svg.chart")
            assert page.is_disabled("#dyn-cleaned")
            label = page.locator("label.check", has=page.locator("#dyn-cleaned"))
            assert "calibration unusable" in label.inner_text()
            assert label.get_attribute("title") == want
            assert any(want in n for n in page.locator("#view-dynamics .notes p").all_inner_texts())

            page.goto(f"{base}/#/models?{PAIR}")
            page.wait_for_selector("#cmp-chart svg.chart")
            assert page.is_disabled("#cmp-cleaned")
            assert page.locator("#cmp-notes p").all_inner_texts() == [want]
            assert errors == []
        finally:
            browser.close()

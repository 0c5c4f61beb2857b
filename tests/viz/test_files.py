"""Raw experiment files under `/files/` can be downloaded but never run on the dashboard's origin.

Anything in `experiments/` may have been planted (a shared results folder, a downloaded tree).
Served inline as HTML, SVG or JS on the dashboard's origin, it could read the API; these tests
plant such files and check the headers, and in headless Chromium that a planted page reads
nothing.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from raypipe.viz.server import make_server
from tests.viz.fixture_tree import write_fixture_tree
from tests.viz.test_browser import CHROMIUM, CHROMIUM_ARGS, _no_browser
from tests.viz.viz_http import raw_request

_STEAL = (
    "fetch('/api/experiments').then(r => r.text())"
    ".then(t => fetch('/api/variants?experiment=demo&stolen=' + encodeURIComponent(t)));"
)
_HTML = (
    "<!doctype html><html><body><h1>hi</h1><script src='evil.js'></script>"
    f"<script>{_STEAL}</script></body></html>"
)
_SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg"><script href="evil.js"></script>'
    f"<script>{_STEAL}</script><circle r='5'/></svg>"
)
_XHTML = (
    '<html xmlns="http://www.w3.org/1999/xhtml"><body><script src="evil.js"></script>'
    f"<script>{_STEAL}</script></body></html>"
)
# Name -> content. Every one of these is something a browser could render or run.
PLANTED = {
    "evil.html": _HTML,
    "EVIL.HTM": _HTML,
    "evil.shtml": _HTML,
    "evil.svg": _SVG,
    "evil.svgz": _SVG,
    "evil.xhtml": _XHTML,
    "evil.xml": _XHTML,
    "evil.xsl": _XHTML,
    "evil.js": _STEAL,
    "evil.mjs": _STEAL,
    "evil.css": "body { background: url('/api/experiments') }",
    "evil.pdf": "%PDF-1.4 " + _HTML,
    "evil.swf": _HTML,
    "evil.wasm": _HTML,
    "evil.appcache": _HTML,
    "evil.json.html": _HTML,
    "evil": _HTML,
    "evil.weird": _HTML,
}
# Files the dashboard's users open or fetch; they keep their own type. The JSON, text and
# image kinds stay viewable in the browser tab, with scripts off should they be sniffed.
KEPT = {
    "data.json": ("application/json", "inline", _HTML),
    "data.html.json": ("application/json", "inline", _HTML),
    "results.jsonl": ("text/plain; charset=utf-8", "inline", _HTML),
    "notes.txt": ("text/plain; charset=utf-8", "inline", _HTML),
    "plot.png": ("image/png", "inline", "\x89PNG\r\n\x1a\n" + _HTML),
    "table.parquet": ("application/vnd.apache.parquet", "attachment", "PAR1" + _HTML),
    "acts.pt": ("application/octet-stream", "attachment", _HTML),
}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    root = tmp_path_factory.mktemp("viz-planted")
    write_fixture_tree(root)
    exp = root / "experiments" / "demo"
    for name, text in PLANTED.items():
        (exp / name).write_text(text)
    for name, (_, _, text) in KEPT.items():
        (exp / name).write_text(text)
    (exp / "inference" / "evil.html").write_text(_HTML)
    srv = make_server(root, "127.0.0.1", 0, quiet=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield root, srv.url.rstrip("/")
    srv.shutdown()
    srv.server_close()


def _get(base: str, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """Status, lower-cased headers and body of a request sent verbatim."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def _assert_sandboxed(headers: dict[str, str]) -> None:
    csp = headers["content-security-policy"]
    directives = [d.strip().split() for d in csp.split(";")]
    assert ["sandbox"] in directives, csp  # a bare sandbox: no allow-scripts, no same origin
    assert "allow-scripts" not in csp and "allow-same-origin" not in csp
    assert headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("name", sorted(PLANTED))
@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_active_files_are_downloads_of_inert_type(planted, name: str, method: str) -> None:
    root, base = planted
    status, headers, body = _get(base, f"/files/demo/{name}", method)
    assert status == 200
    _assert_sandboxed(headers)
    assert headers["content-type"] == "application/octet-stream", name
    assert headers["content-disposition"].startswith("attachment;"), name
    assert f'filename="{name}"' in headers["content-disposition"]
    if method == "GET":
        assert body == (root / "experiments/demo" / name).read_bytes()  # the download is intact
    else:
        assert body == b""


@pytest.mark.parametrize("name", sorted(KEPT))
def test_data_files_keep_their_type_and_are_sandboxed(planted, name: str) -> None:
    root, base = planted
    ctype, disposition, _ = KEPT[name]
    status, headers, body = _get(base, f"/files/demo/{name}")
    assert status == 200 and headers["content-type"] == ctype
    assert headers["content-disposition"].split(";")[0] == disposition
    _assert_sandboxed(headers)
    assert body == (root / "experiments/demo" / name).read_bytes()


def test_pipeline_outputs_still_load(planted) -> None:
    """What a user opens from the tree: config, response and projection JSON, Parquet."""
    root, base = planted
    ps = "starter_prompts/general"
    v = "demo/inference/instruct"
    for rel, ctype in (
        ("demo/config.json", "application/json"),
        (f"{v}/responses/{ps}/0.json", "application/json"),
        (f"{v}/projections/emotion/joy/{ps}/0.json", "application/json"),
        (f"{v}/massive_activations/calibration.json", "application/json"),
        (f"{v}/parquet/projections/{ps}.parquet", "application/vnd.apache.parquet"),
        (f"{v}/parquet/responses/{ps}.parquet", "application/vnd.apache.parquet"),
    ):
        status, headers, body = _get(base, f"/files/{rel}")
        assert status == 200 and headers["content-type"] == ctype, rel
        assert body == (root / "experiments" / rel).read_bytes()
        if ctype == "application/json":
            json.loads(body)
        _assert_sandboxed(headers)


def test_odd_file_names_cannot_inject_headers(planted) -> None:
    root, base = planted
    name = 'a"b;c\u00e9 x.html'
    (root / "experiments/demo" / name).write_text(_HTML)
    status, headers, _ = _get(base, "/files/demo/" + quote(name))
    assert status == 200
    disposition = headers["content-disposition"]
    assert disposition.startswith("attachment;") and "\r" not in disposition
    assert "filename*=UTF-8''a%22b%3Bc%C3%A9%20x.html" in disposition
    assert 'filename="a_b_c_ x.html"' in disposition


def test_errors_under_files_stay_json(planted) -> None:
    _, base = planted
    status, ctype, body = raw_request(base, "/files/demo/nope.html")
    assert status == 404 and ctype == "application/json" and "error" in json.loads(body)


@pytest.mark.skipif(_no_browser() is not None, reason=str(_no_browser()))
def test_planted_pages_cannot_read_the_api_in_a_browser(planted) -> None:
    """Ground truth: open each planted file in Chromium; no script of theirs may reach /api/."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    _, base = planted
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as err:  # any launch failure means: cannot test here
            pytest.skip(f"Chromium did not start: {err}")
        try:
            context = browser.new_context(accept_downloads=True)
            api_calls: list[str] = []
            context.on("request", lambda r: api_calls.append(r.url) if "/api/" in r.url else None)
            page = context.new_page()
            for name in [*PLANTED, *KEPT, "inference/evil.html"]:
                try:
                    page.goto(f"{base}/files/demo/{name}", wait_until="load", timeout=10_000)
                except PlaywrightError as err:
                    # A download is not a page: nothing of it runs.
                    assert "Download is starting" in str(err) or "net::ERR_ABORTED" in str(err)
                page.wait_for_timeout(300)
                assert api_calls == [], f"{name} ran script on the dashboard's origin: {api_calls}"
            # The same check sees the dashboard's own page reading the API, so it can fail.
            page.goto(f"{base}/", wait_until="networkidle")
            assert any("/api/experiments" in u for u in api_calls)
        finally:
            browser.close()

"""Dashboard JSON API: payloads checked against the fixture files, and bad requests are 4xx."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest

from raypipe.store.paths import ExperimentPaths
from raypipe.viz import api
from raypipe.viz.data import Tree
from raypipe.viz.server import main, make_server
from tests.viz.fixture_tree import write_fixture_tree
from tests.viz.viz_http import get_json, raw_request

PS = "starter_prompts/general"
Q = f"experiment=demo&variant=instruct&prompt_set={quote(PS)}"
PAIR = f"experiment=demo&prompt_set={quote(PS)}&variant_a=instruct&variant_b=lora"


def _entry(root: Path, variant: str, trait: str, pid: str, layer: int) -> dict[str, Any]:
    path = root / "experiments/demo/inference" / variant / "projections" / trait / PS
    path = path / f"{pid}.json"
    data = json.loads(path.read_text())
    return next(e for e in data["projections"] if e["layer"] == layer)


def _tokens(root: Path, variant: str, pid: str) -> tuple[list[str], int]:
    path = root / "experiments/demo/inference" / variant / "responses" / PS / f"{pid}.json"
    data = json.loads(path.read_text())
    return data["tokens"], data["prompt_end"]


def _expected(entry: dict, seg: str, mode: str, centered: bool, cleaned: bool) -> np.ndarray:
    """SPEC section 6, written out independently of the server's code."""
    src = entry["cleaned"] if cleaned else entry
    scores = np.array(src[seg], dtype=float)
    norms = np.array(src["token_norms"][seg], dtype=float)
    if centered:
        scores = scores - entry["baseline"]
    if mode == "normalized":
        return scores / norms.mean()
    if mode == "cosine":
        return scores / norms
    return scores


# -- discovery -------------------------------------------------------------------------------


def test_experiments_and_variants(server: str) -> None:
    status, body = get_json(f"{server}/api/experiments")
    assert status == 200
    assert body["experiments"] == [
        {
            "name": "demo",
            "variants": ["instruct", "lora"],
            "defaults": {"extraction": "instruct", "application": "instruct"},
        }
    ]
    status, body = get_json(f"{server}/api/variants?experiment=demo")
    assert status == 200
    by_name = {v["name"]: v for v in body["variants"]}
    assert by_name["instruct"]["has_calibration"] and by_name["instruct"]["massive_dims"] == [
        12,
        400,
    ]
    assert not by_name["lora"]["has_calibration"]
    assert by_name["lora"]["lora"] == "adapters/sycophant"


def test_prompt_sets_prompts_traits(server: str, tree: dict) -> None:
    status, body = get_json(f"{server}/api/prompt_sets?experiment=demo&variant=lora")
    assert status == 200
    assert body["prompt_sets"] == [{"name": PS, "n_prompts": 5, "has_parquet": True}]
    status, body = get_json(f"{server}/api/prompts?{Q}")
    assert [p["id"] for p in body["prompts"]] == tree["prompt_ids"]
    assert body["prompts"][1]["preview"].startswith("I can't help")
    status, body = get_json(f"{server}/api/traits?{Q}")
    assert sorted(t["trait"] for t in body["traits"]) == sorted(tree["traits"])
    assert all(t["layers"] == [12, 16] and t["has_cleaned"] for t in body["traits"])
    status, body = get_json(f"{server}/api/traits?{Q.replace('instruct', 'lora')}")
    assert not any(t["has_cleaned"] for t in body["traits"])


# -- Trait Dynamics --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["raw", "normalized", "cosine"])
@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("cleaned", [False, True])
def test_prompt_scores_in_every_mode(
    server: str, tree: dict, mode: str, centered: bool, cleaned: bool
) -> None:
    url = f"{server}/api/prompt?{Q}&prompt_id=2&mode={mode}&centered={int(centered)}"
    status, body = get_json(f"{url}&cleaned={int(cleaned)}")
    assert status == 200, body
    tokens, end = _tokens(tree["root"], "instruct", "2")
    assert body["response"]["tokens"] == tokens and body["response"]["prompt_end"] == end
    assert body["calibration"] == {"massive_dims": [12, 400]}
    assert {t["trait"] for t in body["traits"]} == set(tree["traits"])
    for trait in body["traits"]:
        assert [s["layer"] for s in trait["series"]] == [12, 16]
        for series in trait["series"]:
            entry = _entry(tree["root"], "instruct", trait["trait"], "2", series["layer"])
            for seg in ("prompt", "response"):
                want = _expected(entry, seg, mode, centered, cleaned)
                assert series[seg] == pytest.approx(want.tolist(), rel=1e-5, abs=1e-7)
    assert body["warnings"] == [] and body["missing_traits"] == []


def test_cleaned_scores_need_calibration(server: str) -> None:
    q = Q.replace("instruct", "lora")
    status, body = get_json(f"{server}/api/prompt?{q}&prompt_id=0&cleaned=1")
    assert status == 400 and "cleaned" in body["error"]


# -- Model Analysis --------------------------------------------------------------------------


def test_compare_summary_matches_files(server: str, tree: dict) -> None:
    trait = "persona/sycophancy"
    status, body = get_json(f"{server}/api/compare?{PAIR}&trait={quote(trait)}&layer=16")
    assert status == 200, body
    assert body["source"] == "parquet" and body["layer"] == 16
    assert [r["prompt_id"] for r in body["rows"]] == tree["prompt_ids"]
    root = tree["root"]
    for row in body["rows"]:
        pid = row["prompt_id"]
        a = _entry(root, "instruct", trait, pid, 16)["response"]
        b = _entry(root, "lora", trait, pid, 16)["response"]
        ta, ea = _tokens(root, "instruct", pid)
        tb, _ = _tokens(root, "lora", pid)
        shared = 0
        while shared < min(len(ta), len(tb)) and ta[shared] == tb[shared]:
            shared += 1
        n = shared - ea
        diff = np.array(b[:n]) - np.array(a[:n])
        assert row["tokens_match"] == (ta == tb)
        assert row["n_compared"] == n
        assert row["mean_a"] == pytest.approx(np.mean(a))
        assert row["mean_b"] == pytest.approx(np.mean(b))
        assert row["mean_diff"] == pytest.approx(diff.mean())
        assert row["max_diff"] == pytest.approx(diff.max())
        assert row["max_at"] == int(diff.argmax())
        assert row["max_token"] == ta[ea + int(diff.argmax())]
    diverging = next(r for r in body["rows"] if r["prompt_id"] == tree["diverging_prompt"])
    assert not diverging["tokens_match"] and diverging["n_compared"] < diverging["n_tokens"]


def test_compare_json_and_parquet_agree(tmp_path: Path, server: str) -> None:
    info = write_fixture_tree(tmp_path)
    for variant in info["variants"]:
        shutil.rmtree(tmp_path / "experiments/demo/inference" / variant / "parquet")
    query = f"{PAIR}&trait=emotion%2Fjoy&mode=cosine&centered=1"
    from_json = api.compare(Tree(tmp_path), api.Query(query, api.ROUTES["/api/compare"][1]))
    status, from_parquet = get_json(f"{server}/api/compare?{query}")
    assert status == 200 and from_json["source"] == "json"
    for r1, r2 in zip(from_json["rows"], from_parquet["rows"], strict=True):
        for key, value in r1.items():
            assert r2[key] == (pytest.approx(value) if isinstance(value, float) else value), key


def test_compare_prompt_diff(server: str, tree: dict) -> None:
    url = f"{server}/api/compare_prompt?{PAIR}&trait=emotion%2Fjoy&mode=normalized"
    status, body = get_json(f"{url}&prompt_id=0")
    assert status == 200, body
    assert body["tokens_match"] and body["tokens_b"] is None
    a, b = np.array(body["a"]), np.array(body["b"])
    assert body["diff"] == pytest.approx((b - a).tolist())
    status, body = get_json(f"{url}&prompt_id={tree['diverging_prompt']}")
    assert status == 200
    assert not body["tokens_match"] and body["tokens_b"] is not None
    k = body["common_prefix"]
    assert all(v is None for v in body["diff"][k:]) and None not in body["diff"][:k]


# -- Overview --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["raw", "normalized", "cosine"])
@pytest.mark.parametrize("centered", [False, True])
def test_overview_matches_files(server: str, tree: dict, mode: str, centered: bool) -> None:
    url = f"{server}/api/overview?{Q}&mode={mode}&centered={int(centered)}&bins=4&top=3"
    status, body = get_json(url)
    assert status == 200, body
    assert body["n_prompts"] == 5
    assert len(body["groups"]) == len(tree["traits"]) * len(tree["layers"])
    for group in body["groups"]:
        means = {
            pid: float(
                _expected(
                    _entry(tree["root"], "instruct", group["trait"], pid, group["layer"]),
                    "response",
                    mode,
                    centered,
                    False,
                ).mean()
            )
            for pid in tree["prompt_ids"]
        }
        want = np.array(list(means.values()))
        assert group["n"] == 5 and group["mean"] == pytest.approx(want.mean(), rel=1e-5)
        assert group["min"] == pytest.approx(want.min(), rel=1e-5)
        assert sum(group["histogram"]["counts"]) == 5 and len(group["histogram"]["edges"]) == 5
        ranked = sorted(means, key=means.get, reverse=True)[:3]
        assert [t["prompt_id"] for t in group["top"]] == ranked
        assert group["top"][0]["score"] == pytest.approx(means[ranked[0]], rel=1e-5)
        assert group["top"][0]["preview"]


# -- bad requests ----------------------------------------------------------------------------

BAD = [
    ("/api/variants", 400),
    ("/api/variants?experiment=nope", 404),
    ("/api/variants?experiment=..", 404),
    ("/api/variants?experiment=..%2F..%2Fetc", 404),
    ("/api/variants?experiment=%2Fetc", 404),
    ("/api/variants?experiment=demo&experiment=demo", 400),
    ("/api/variants?experiment=demo&bogus=1", 400),
    ("/api/variants?experiment=de%00mo", 400),
    ("/api/prompt_sets?experiment=demo&variant=..", 404),
    ("/api/prompt_sets?experiment=demo&variant=base", 404),
    ("/api/prompts?experiment=demo&variant=instruct&prompt_set=..%2F..%2F..%2Fconfig", 404),
    (f"/api/prompts?experiment=demo&variant=instruct&prompt_set={quote('a/../' + PS)}", 404),
    ("/api/prompts?experiment=demo&variant=instruct&prompt_set=%2Fetc", 404),
    (f"/api/prompt?{Q}", 400),
    (f"/api/prompt?{Q}&prompt_id=99", 404),
    (f"/api/prompt?{Q}&prompt_id=..%2F..%2F..%2F..%2Fconfig", 404),
    (f"/api/prompt?{Q}&prompt_id=..", 404),
    (f"/api/prompt?{Q}&prompt_id=.hidden", 404),
    (f"/api/prompt?{Q}&prompt_id=0&mode=loud", 400),
    (f"/api/prompt?{Q}&prompt_id=0&centered=maybe", 400),
    (f"/api/compare?{PAIR}", 400),
    (f"/api/compare?{PAIR}&trait=..%2F..%2Femotion%2Fjoy", 404),
    (f"/api/compare?{PAIR}&trait=emotion%2Fsadness", 404),
    (f"/api/compare?{PAIR}&trait=emotion%2Fjoy&layer=7", 404),
    (f"/api/compare?{PAIR}&trait=emotion%2Fjoy&layer=twelve", 400),
    (f"/api/compare?{PAIR}&trait=emotion%2Fjoy&layer=-1", 400),
    (f"/api/compare?{PAIR}&trait=emotion%2Fjoy&method=mean_diff", 404),
    (f"/api/compare?{PAIR}&trait=emotion%2Fjoy&cleaned=1", 400),
    (f"/api/compare_prompt?{PAIR}&trait=emotion%2Fjoy", 400),
    (f"/api/compare_prompt?{PAIR}&trait=emotion%2Fjoy&prompt_id=42", 404),
    (f"/api/compare?{PAIR.replace('lora', 'nope')}&trait=emotion%2Fjoy", 404),
    (f"/api/overview?{Q}&bins=0", 400),
    (f"/api/overview?{Q}&bins=many", 400),
    (f"/api/overview?{Q}&top=1000", 400),
    (f"/api/overview?{Q}&cleaned=1", 400),
    ("/api/overview?experiment=demo&variant=instruct&prompt_set=missing%2Fset", 404),
    ("/api/nothing", 404),
]


@pytest.mark.parametrize(("path", "status"), BAD)
def test_bad_requests_are_4xx_with_json(server: str, path: str, status: int) -> None:
    code, body = get_json(server + path)
    assert code == status, body
    assert isinstance(body.get("error"), str) and body["error"]


RAW_PATHS = [
    "/files/../../../../etc/passwd",
    "/files/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/files/demo/../../../etc/passwd",
    "/files/demo/%2e%2e%2f%2e%2e%2fdemo/config.json",
    "/files//etc/passwd",
    "/files/demo/inference/instruct/responses/starter_prompts/general/99.json",
    "/files/demo/.hidden",
    "/files/demo",
    "/static/../server.py",
    "/static/%2e%2e/server.py",
    "/static/..%5cserver.py",
    "/static/",
    "/../../etc/passwd",
    "/etc/passwd",
]


@pytest.mark.parametrize("path", RAW_PATHS)
def test_path_traversal_is_404(server: str, path: str) -> None:
    status, ctype, body = raw_request(server, path)
    assert status == 404, path
    assert ctype == "application/json" and "error" in json.loads(body)


def test_files_and_static_are_served(server: str) -> None:
    status, ctype, body = raw_request(server, "/files/demo/config.json")
    assert status == 200 and json.loads(body)["defaults"]["application"] == "instruct"
    status, ctype, body = raw_request(server, "/static/app.js")
    assert status == 200 and ctype.startswith("text/javascript")
    status, ctype, body = raw_request(server, "/")
    assert status == 200 and b"raypipe" in body and ctype.startswith("text/html")


def test_only_get_and_loopback_host(server: str) -> None:
    status, ctype, body = raw_request(server, "/api/experiments", method="POST")
    assert status == 405 and "error" in json.loads(body)
    status, _, body = raw_request(server, "/api/experiments", headers={"Host": "evil.example:80"})
    assert status == 403 and "error" in json.loads(body)
    status, _, _ = raw_request(server, "/api/experiments", headers={"Host": "localhost:1"})
    assert status == 200


# -- trees that are broken or try to escape --------------------------------------------------


@pytest.fixture()
def odd_tree(tmp_path: Path):
    """A fresh tree the test may damage, with its own server."""
    import threading

    root = tmp_path / "root"
    write_fixture_tree(root)
    srv = make_server(root, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield root, srv.url.rstrip("/")
    srv.shutdown()
    srv.server_close()


def test_symlinks_out_of_the_tree_are_404(odd_tree, tmp_path: Path) -> None:
    root, base = odd_tree
    outside = tmp_path / "outside"
    write_fixture_tree(outside)
    secret = outside / "secret.json"
    secret.write_text('{"tokens": ["x"], "prompt_end": 0}')
    os.symlink(outside / "experiments" / "demo", root / "experiments" / "escape")
    folder = root / "experiments/demo/inference/instruct/responses" / PS
    os.symlink(secret, folder / "77.json")
    code, body = get_json(f"{base}/api/experiments")
    assert [e["name"] for e in body["experiments"]] == ["demo"]
    for path in (
        "/api/variants?experiment=escape",
        f"/api/prompt?{Q}&prompt_id=77",
    ):
        code, body = get_json(base + path)
        assert code == 404 and "error" in body, path
    status, _, _ = raw_request(base, "/files/escape/config.json")
    assert status == 404
    status, _, _ = raw_request(base, f"/files/demo/inference/instruct/responses/{PS}/77.json")
    assert status == 404
    os.symlink(folder / "loop.json", folder / "loop.json")
    code, body = get_json(f"{base}/api/prompt?{Q}&prompt_id=loop")
    assert code == 404 and "error" in body
    status, _, _ = raw_request(base, "/files/" + "z" * 300)
    assert status == 404


def test_broken_files_are_422_not_500(odd_tree) -> None:
    root, base = odd_tree
    vdir = root / "experiments/demo/inference/instruct"
    (vdir / "responses" / PS / "3.json").write_text("{not json")
    (vdir / "projections/emotion/joy" / PS / "1.json").write_text('{"metadata": {}}')
    (vdir / "parquet/projections" / f"{PS}.parquet").write_bytes(b"PAR1 broken")
    code, body = get_json(f"{base}/api/prompt?{Q}&prompt_id=3")
    assert code == 422 and "3.json" in body["error"]
    code, body = get_json(f"{base}/api/prompt?{Q}&prompt_id=1")
    assert code == 422 and "projections" in body["error"]
    code, body = get_json(f"{base}/api/overview?{Q}")
    assert code == 422 and "Parquet" in body["error"]
    (root / "experiments/demo/config.json").write_text("[1, 2")
    code, body = get_json(f"{base}/api/experiments")
    assert code == 200 and "error" in body["experiments"][0]


def test_missing_table_is_named_where_the_store_puts_it(odd_tree) -> None:
    root, base = odd_tree
    table = ExperimentPaths(root, "demo").parquet_file("instruct", "projections", PS)
    table.unlink()
    code, body = get_json(f"{base}/api/overview?{Q}")
    assert code == 404 and f"(expected {table.relative_to(root)})" in body["error"], body


def test_zero_norms_give_null_not_nan(odd_tree) -> None:
    root, base = odd_tree
    path = root / "experiments/demo/inference/instruct/projections/emotion/joy" / PS / "0.json"
    data = json.loads(path.read_text())
    data["projections"][0]["token_norms"]["response"][0] = 0.0
    path.write_text(json.dumps(data))
    code, body = get_json(f"{base}/api/prompt?{Q}&prompt_id=0&mode=cosine")
    assert code == 200
    joy = next(t for t in body["traits"] if t["trait"] == "emotion/joy")
    assert joy["series"][0]["response"][0] is None


def test_server_never_writes_under_root(server: str, tree: dict) -> None:
    def snapshot() -> dict[str, tuple[int, int]]:
        out = {}
        for dirpath, _, files in os.walk(tree["root"]):
            for name in files:
                st = os.stat(os.path.join(dirpath, name))
                out[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns)
        return out

    before = snapshot()
    for path in (
        "/api/experiments",
        f"/api/prompts?{Q}",
        f"/api/prompt?{Q}&prompt_id=0&cleaned=1&mode=cosine",
        f"/api/compare?{PAIR}&trait=emotion%2Fjoy",
        f"/api/overview?{Q}&mode=cosine",
    ):
        assert get_json(server + path)[0] == 200
    assert snapshot() == before


def test_cli_without_experiments_folder(tmp_path: Path, capsys) -> None:
    assert main(["--root", str(tmp_path), "--port", "0"]) == 2
    assert "no experiments/ folder" in capsys.readouterr().err


GOOD = {
    "experiment": "demo",
    "variant": "instruct",
    "variant_a": "instruct",
    "variant_b": "lora",
    "prompt_set": PS,
    "prompt_id": "0",
    "trait": "emotion/joy",
    "layer": "12",
    "method": "probe",
    "mode": "raw",
    "centered": "0",
    "cleaned": "0",
    "bins": "10",
    "top": "3",
}
JUNK = [
    "",
    "..",
    "../..",
    "/",
    "\\",
    "%00",
    "\x00",
    "a\x00b",
    "a/../b",
    "x" * 600,
    "y" * 300,
    "é/ü",
    "-1",
    "1e9",
    "NaN",
    " ",
]


@pytest.mark.parametrize("route", sorted(api.ROUTES))
def test_no_parameter_value_gives_500(server: str, route: str) -> None:
    allowed = sorted(api.ROUTES[route][1])
    good = {k: GOOD[k] for k in allowed}
    for name in allowed:
        for junk in JUNK:
            params = {**good, name: junk}
            query = "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())
            status, body = get_json(f"{server}{route}?{query}")
            assert status < 500, (route, name, junk, body)
            if status >= 400:
                assert body["error"], (route, name, junk)


def test_binds_loopback_by_default(tree: dict) -> None:
    srv = make_server(tree["root"], port=0, quiet=True)
    try:
        assert srv.server_address[0] == "127.0.0.1" and srv.check_host
    finally:
        srv.server_close()


def test_module_entry_point_help() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "raypipe.viz", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert out.returncode == 0 and "--root" in out.stdout and "127.0.0.1" in out.stdout

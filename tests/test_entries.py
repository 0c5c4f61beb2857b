"""New layers, traits or methods are projected into existing files, per (method, layer) entry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from raypipe.cli import main
from tests.conftest import PROMPTS, TRAITS, copy_tree, infer

N = len(PROMPTS)


def out_dir(root: Path) -> Path:
    return root / "experiments" / "tiny" / "inference" / "base"


def projection_files(root: Path, trait: str | None = None) -> dict[str, Path]:
    base = out_dir(root) / "projections"
    pattern = f"{trait}/tests/small/*.json" if trait else "*/*/tests/small/*.json"
    return {str(p.relative_to(base)): p for p in sorted(base.glob(pattern))}


def entries(path: Path) -> dict[tuple[str, int], dict]:
    return {(e["method"], e["layer"]): e for e in json.loads(path.read_text())["projections"]}


def keys(path: Path) -> list[tuple[str, int]]:
    return [(e["method"], e["layer"]) for e in json.loads(path.read_text())["projections"]]


def status(root: Path, capsys, *flags: str) -> dict[str, tuple[int, int]]:
    """(present, missing) per trait, from `raypipe status --json` with these flags."""
    capsys.readouterr()
    args = ["status", "--root", str(root), "--experiment", "tiny", "--prompt-set", "tests/small"]
    assert main([*args, *flags, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    return {t: (v["present"], v["missing"]) for t, v in st["projections"].items()}


def summary(capsys) -> str:
    return capsys.readouterr().out


def parquet_keys(root: Path) -> list[tuple]:
    table = pq.read_table(out_dir(root) / "parquet" / "projections" / "tests" / "small.parquet")
    cols = ("prompt_id", "trait", "method", "layer", "component")
    return list(zip(*(table.column(c).to_pylist() for c in cols)))


def assert_scores_equal(a: dict, b: dict) -> None:
    for part in ("prompt", "response", "normalized_prompt", "normalized_response"):
        np.testing.assert_allclose(a[part], b[part], rtol=1e-6, atol=1e-7)
    for part in ("prompt", "response"):
        np.testing.assert_allclose(a["token_norms"][part], b["token_norms"][part], rtol=1e-6)


def test_new_layer_is_projected_next_to_the_best_one(
    ray_session, tiny_root, tmp_path_factory, capsys
):
    fresh = copy_tree(tiny_root, tmp_path_factory.mktemp("fresh") / "root")
    assert infer(tiny_root, "--layers", "best") == 0  # best = layer 1 (largest effect size)
    summary(capsys)
    first = {k: entries(p) for k, p in projection_files(tiny_root).items()}
    assert len(first) == N * len(TRAITS)
    assert all(list(e) == [("probe", 1)] for e in first.values())
    assert status(tiny_root, capsys, "--layers", "3") == {t: (0, N) for t in TRAITS}
    assert status(tiny_root, capsys, "--layers", "best") == {t: (N, 0) for t in TRAITS}

    assert infer(tiny_root, "--layers", "3") == 0
    printed = summary(capsys)
    assert f"done {N} | skipped 0" in printed and "generated 0" in printed, printed
    for name, path in projection_files(tiny_root).items():
        assert keys(path) == [("probe", 1), ("probe", 3)], name
        got = entries(path)
        assert got[("probe", 1)] == first[name][("probe", 1)]  # kept as it was
        meta = json.loads(path.read_text())["metadata"]
        assert meta["multi_vector"] is True and meta["n_vectors"] == 2
    assert status(tiny_root, capsys, "--layers", "3") == {t: (N, 0) for t in TRAITS}
    assert status(tiny_root, capsys, "--layers", "best,3") == {t: (N, 0) for t in TRAITS}
    rows = parquet_keys(tiny_root)
    assert len(rows) == len(set(rows)) == N * len(TRAITS) * 2
    assert {r[3] for r in rows} == {1, 3}

    # Layer 3 scores are those of a run that asked for layer 3 from the start.
    assert infer(fresh, "--layers", "3") == 0
    summary(capsys)
    for name, path in projection_files(fresh).items():
        assert keys(path) == [("probe", 3)]
        assert_scores_equal(
            entries(projection_files(tiny_root)[name])[("probe", 3)], entries(path)[("probe", 3)]
        )

    # --force recomputes the requested entries and keeps every other one as it is.
    for path in projection_files(tiny_root).values():
        rec = json.loads(path.read_text())
        for e in rec["projections"]:
            e["prompt"] = [0.0] * len(e["prompt"])  # marks what a run rewrites
        path.write_text(json.dumps(rec))
    assert infer(tiny_root, "--layers", "3", "--force") == 0
    assert f"done {N}" in summary(capsys)
    for name, path in projection_files(tiny_root).items():
        got = entries(path)
        assert list(got) == [("probe", 1), ("probe", 3)]
        assert set(got[("probe", 1)]["prompt"]) == {0.0}  # not asked for: left alone
        assert_scores_equal(got[("probe", 3)], entries(projection_files(fresh)[name])[("probe", 3)])

    # A regenerated response makes every old entry meaningless: they go.
    assert infer(tiny_root, "--layers", "3", "--regenerate") == 0
    assert f"done {N}" in summary(capsys)
    for name, path in projection_files(tiny_root).items():
        assert keys(path) == [("probe", 3)], name
    rows = parquet_keys(tiny_root)
    assert len(rows) == len(set(rows)) == N * len(TRAITS)


def test_new_trait_and_new_layer_in_one_run(ray_session, tiny_root, capsys):
    alpha, beta = TRAITS
    assert infer(tiny_root, "--layers", "best", "--traits", alpha) == 0
    summary(capsys)
    assert status(tiny_root, capsys, "--layers", "best,3") == {alpha: (0, N), beta: (0, N)}
    assert status(tiny_root, capsys, "--layers", "best", "--traits", alpha) == {alpha: (N, 0)}
    assert infer(tiny_root, "--layers", "best,3") == 0
    printed = summary(capsys)
    assert f"done {N} | skipped 0" in printed and "generated 0" in printed, printed
    for trait in TRAITS:
        for path in projection_files(tiny_root, trait).values():
            assert keys(path) == [("probe", 1), ("probe", 3)]
    assert status(tiny_root, capsys, "--layers", "best,3") == {alpha: (N, 0), beta: (N, 0)}
    # Nothing left to do: the same run again skips every prompt.
    before = {k: p.read_bytes() for k, p in projection_files(tiny_root).items()}
    assert infer(tiny_root, "--layers", "best,3") == 0
    assert f"done 0 | skipped {N}" in summary(capsys)
    assert {k: p.read_bytes() for k, p in projection_files(tiny_root).items()} == before


def test_another_method_and_another_setting(ray_session, tiny_root, capsys):
    assert infer(tiny_root, "--layers", "2") == 0
    summary(capsys)
    probe = {k: entries(p) for k, p in projection_files(tiny_root).items()}
    flags = ("--layers", "2", "--method", "mean_diff")
    assert status(tiny_root, capsys, *flags) == {t: (0, N) for t in TRAITS}
    assert infer(tiny_root, *flags) == 0
    assert f"done {N} | skipped 0" in summary(capsys)
    for name, path in projection_files(tiny_root).items():
        got = entries(path)
        assert list(got) == [("mean_diff", 2), ("probe", 2)]
        assert got[("probe", 2)] == probe[name][("probe", 2)]
    assert status(tiny_root, capsys, *flags) == {t: (N, 0) for t in TRAITS}
    assert status(tiny_root, capsys, "--layers", "2") == {t: (N, 0) for t in TRAITS}
    rows = parquet_keys(tiny_root)
    assert len(rows) == len(set(rows)) == N * len(TRAITS) * 2

    # One file holds one centered setting: a --centered run replaces the uncentered entries,
    # and says so.
    assert infer(tiny_root, "--layers", "2", "--centered", quiet=False) == 0
    out = capsys.readouterr()
    assert f"done {N} | skipped 0" in out.out
    assert "replace" in out.err and "centered" in out.err, out.err
    for name, path in projection_files(tiny_root).items():
        rec = json.loads(path.read_text())
        assert rec["metadata"]["centered"] is True
        assert keys(path) == [("probe", 2)]
        (e,) = rec["projections"]
        want = np.array(probe[name][("probe", 2)]["response"]) - e["baseline"]
        np.testing.assert_allclose(e["response"], want, rtol=1e-5, atol=1e-6)
    # status (no --centered flag) asks what an uncentered run would do: all of it.
    assert status(tiny_root, capsys, "--layers", "2") == {t: (0, N) for t in TRAITS}


def test_from_activations_adds_a_layer(ray_session, tiny_root, capsys):
    assert infer(tiny_root, "--capture", "--layers", "1,3") == 0
    assert infer(tiny_root, "--from-activations", "--layers", "1") == 0
    summary(capsys)
    first = {k: entries(p) for k, p in projection_files(tiny_root).items()}
    assert status(tiny_root, capsys, "--layers", "1,3") == {t: (0, N) for t in TRAITS}
    assert infer(tiny_root, "--from-activations", "--layers", "1,3") == 0
    assert f"done {N} | skipped 0" in summary(capsys)
    for name, path in projection_files(tiny_root).items():
        assert keys(path) == [("probe", 1), ("probe", 3)]
        assert entries(path)[("probe", 1)] == first[name][("probe", 1)]
    assert status(tiny_root, capsys, "--layers", "1,3") == {t: (N, 0) for t in TRAITS}
    rows = parquet_keys(tiny_root)
    assert len(rows) == len(set(rows)) == N * len(TRAITS) * 2


def test_update_projection_merges_by_entry(tmp_path):
    """The store's rule on its own: what is kept, what is merged in, what replaces the file."""
    from raypipe.store.outputs import (
        ProjectionSettings,
        VectorInfo,
        projection_contents,
        projection_entry,
        projection_record,
        update_projection,
    )

    def record(layers, method="probe", centered=False, dims=None, value=1.0):
        entries = []
        for layer in layers:
            scores = np.full(4, value, dtype=np.float32)
            norms = np.ones(4, dtype=np.float32)
            cleaned = (scores - 0.5, norms, list(dims)) if dims else None
            info = VectorInfo("a/b", method, "response[:]", layer, "layers_arg", 0.25)
            entries.append(projection_entry(info, scores, norms, 3, centered, cleaned))
        return projection_record(
            prompt_id="0",
            prompt_set="s",
            n_prompt_tokens=3,
            n_response_tokens=1,
            component="residual",
            position="response[:]",
            centered=centered,
            entries=entries,
        )

    def held(path):
        return [
            (e["method"], e["layer"], e["prompt"][0])
            for e in json.loads(path.read_text())["projections"]
        ]

    path = tmp_path / "0.json"
    plain = ProjectionSettings("residual", False, "response[:]")
    assert projection_contents(path) is None
    assert update_projection(path, record([2]))
    assert not update_projection(path, record([2], value=9.0))  # held: kept as it was
    assert update_projection(path, record([3, 0], value=2.0))
    assert held(path) == [("probe", 0, 2.0), ("probe", 2, 1.0), ("probe", 3, 2.0)]
    assert json.loads(path.read_text())["metadata"]["n_vectors"] == 3
    assert update_projection(path, record([2], method="mean_diff", value=3.0))
    assert held(path)[1:3] == [("mean_diff", 2, 3.0), ("probe", 2, 1.0)]
    contents = projection_contents(path)
    assert contents.missing(plain, [("probe", 2), ("probe", 1), ("mean_diff", 2)]) == [("probe", 1)]
    # With --force the run's entries win; the others stay.
    assert update_projection(path, record([2], value=5.0), force=True)
    assert ("probe", 2, 5.0) in held(path) and ("probe", 0, 2.0) in held(path)
    # Cleaned scores asked for: an entry without them (or cleaned of other dims) is not held.
    assert contents.missing(plain, [("probe", 2)], dims=[7]) == [("probe", 2)]
    assert update_projection(path, record([2], value=6.0, dims=[7]))
    assert projection_contents(path).missing(plain, [("probe", 2)], dims=[7]) == []
    assert projection_contents(path).missing(plain, [("probe", 2)], dims=[8]) == [("probe", 2)]
    assert projection_contents(path).missing(plain, [("probe", 2)]) == []
    # Other settings or a regenerated response: the run's record replaces the file.
    assert update_projection(path, record([1], centered=True))
    assert held(path) == [("probe", 1, 0.75)]
    centered = ProjectionSettings("residual", True, "response[:]")
    assert projection_contents(path).missing(centered, [("probe", 1)]) == []
    assert projection_contents(path).missing(plain, [("probe", 1)]) == [("probe", 1)]
    assert update_projection(path, record([1, 2], centered=True))
    assert update_projection(path, record([3], centered=True), fresh=True)
    assert held(path) == [("probe", 3, 0.75)]
    # A broken file holds nothing and is written again.
    path.write_text('{"metadata": {"component": "resid')
    assert projection_contents(path) is None
    assert update_projection(path, record([1]))
    assert held(path) == [("probe", 1, 1.0)]

"""Crash safety: a killed driver or worker, or one bad prompt, never costs finished work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from raypipe.cli import main
from raypipe.store.atomic import TMP_MARK
from tests.conftest import PROMPTS, TRAITS, copy_tree
from tests.tiny import WORDS, write_prompt_set

REPO = Path(__file__).resolve().parents[1]
ARGS = [
    "--experiment",
    "tiny",
    "--prompt-set",
    "tests/small",
    "--dtype",
    "float32",
    "--max-new-tokens",
    "6",
    "--batch-size",
    "2",
    "--layers",
    "1,2",
    "--quiet",
]
DATE_KEYS = {"capture_date", "projection_date", "timestamp"}
ALL_PROJECTIONS = len(PROMPTS) * len(TRAITS)
RUN_TIMEOUT = 240  # seconds for one run on a loaded 2-core machine


def out_dir(root: Path) -> Path:
    return root / "experiments" / "tiny" / "inference" / "base"


def n_json(root: Path, kind: str) -> int:
    folder = out_dir(root) / kind
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.rglob("*.json") if TMP_MARK not in p.name)


# ---------------------------------------------------------------- processes of one run


def proc_table() -> dict[int, tuple[int, int, str]]:
    """Live processes (zombies excluded), from /proc: pid -> (parent pid, session, command)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            state, ppid, _pgrp, session = stat.rsplit(")", 1)[1].split()[:4]
            if state in "ZX":
                continue
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, ValueError):
            continue  # exited while we looked
        out[int(entry)] = (int(ppid), int(session), cmd.decode(errors="replace").strip())
    return out


def session_procs(sid: int) -> dict[int, str]:
    """Processes in session `sid`: pid -> command line. Ray moves each worker into a process
    group of its own, but not out of the driver's session."""
    return {pid: cmd for pid, (_, s, cmd) in proc_table().items() if s == sid}


def descendants(root_pid: int) -> dict[int, str]:
    """Processes below `root_pid` in the process tree: pid -> command line."""
    table = proc_table()
    out = {}
    for pid, (_, _, cmd) in table.items():
        up, seen = pid, 0
        while up in table and up != root_pid and seen < 64:
            up, seen = table[up][0], seen + 1
        if up == root_pid and pid != root_pid:
            out[pid] = cmd
    return out


class Run:
    """`raypipe infer` in a subprocess that leads its own session, so that everything it
    starts (its own local Ray: gcs, raylet, workers) can be found and killed with it."""

    def __init__(self, root: Path, logs: Path, *extra: str):
        logs.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
        # "local": always a fresh Ray of this run's own, never a cluster found on the machine.
        env["RAY_ADDRESS"] = "local"
        self.stderr = logs / "stderr.txt"
        cmd = [sys.executable, "-m", "raypipe.cli", "infer", "--root", str(root), *ARGS, *extra]
        with open(logs / "stdout.txt", "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True
            )
        self.sid = self.proc.pid

    def tail(self) -> str:
        return self.stderr.read_text(errors="replace")[-3000:]

    def wait_for(self, what: str, ready, timeout: float = RUN_TIMEOUT):
        """Poll every 0.1 s until `ready()` returns something truthy; the run must still be on."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = ready()
            if got:
                return got
            if self.proc.poll() is not None:
                pytest.fail(f"run exited ({self.proc.returncode}) before {what}:\n{self.tail()}")
            time.sleep(0.1)
        self.kill()
        pytest.fail(f"timed out waiting for {what}:\n{self.tail()}")

    def kill(self, grace: float = 5) -> dict[int, str]:
        """SIGKILL the driver's process group (driver, gcs, raylet); Ray workers sit in groups
        of their own and should exit when their raylet dies. Returns those still alive after
        `grace` seconds, which are then killed by pid."""
        try:
            os.killpg(self.sid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        return self.reap(grace)

    def reap(self, grace: float) -> dict[int, str]:
        """Processes of this run still alive after `grace` seconds (returned), then killed."""
        deadline = time.monotonic() + grace
        left = session_procs(self.sid)
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = session_procs(self.sid)
        survivors = dict(left)
        for _ in range(50):  # a raylet may fork a worker while we kill: repeat until empty
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
            left = session_procs(self.sid)
        assert not left, f"could not kill {left}"
        return survivors

    def finish(self, timeout: float = RUN_TIMEOUT) -> tuple[int, dict[int, str]]:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"run did not finish in {timeout} s:\n{self.tail()}")
        # A clean exit shuts its Ray down; allow the stragglers a few seconds to go.
        return rc, self.reap(grace=10)


# ---------------------------------------------------------------- comparing output trees


def strip_dates(obj):
    if isinstance(obj, dict):
        return {k: strip_dates(v) for k, v in obj.items() if k not in DATE_KEYS}
    if isinstance(obj, list):
        return [strip_dates(v) for v in obj]
    return obj


def tree(root: Path) -> dict[str, Path]:
    """The run's outputs (its logs, named by the time each run started, are not outputs)."""
    base = out_dir(root)
    files = (p for p in sorted(base.rglob("*")) if p.is_file())
    return {str(p.relative_to(base)): p for p in files if p.relative_to(base).parts[0] != "logs"}


def assert_same_output(root: Path, ref: Path, n_prompts: int = len(PROMPTS)) -> None:
    got, want = tree(root), tree(ref)
    stray = [k for k in got if TMP_MARK in k]
    assert not stray, f"temp files left behind: {stray}"
    assert sorted(got) == sorted(want)
    for key, path in got.items():
        if not key.endswith(".json") or key.startswith("massive_activations"):
            continue
        a, b = json.loads(path.read_text()), json.loads(want[key].read_text())
        assert strip_dates(a) == strip_dates(b), f"{key} differs from the uninterrupted run"
    # Whatever the crash history, the calibration counts every prompt once.
    assert_same_calibration(root, ref, n_prompts)
    for table, rows in (("projections", n_prompts * len(TRAITS) * 2), ("responses", n_prompts)):
        path = out_dir(root) / "parquet" / table / "tests" / "small.parquet"
        t = pq.read_table(path)
        assert t.num_rows == rows == pq.read_table(str(path).replace(str(root), str(ref))).num_rows
        keys = ["prompt_id", "trait", "layer"] if table == "projections" else ["prompt_id"]
        cols = list(zip(*(t.column(k).to_pylist() for k in keys)))
        assert len(set(cols)) == len(cols), f"duplicate rows in the {table} table"


def calibration(root: Path) -> dict:
    return json.loads((out_dir(root) / "massive_activations" / "calibration.json").read_text())


def assert_same_calibration(root: Path, ref: Path, n_prompts: int = len(PROMPTS)) -> None:
    """The same prompts and tokens as the uninterrupted run's, statistics equal to fp32
    summation noise (batches met the collector in other company), nothing left to go on."""
    from raypipe.store.calibration import state_file
    from tests.test_calibration import assert_close

    got, want = calibration(root), calibration(ref)
    assert got["complete"] is True and want["complete"] is True
    assert got["tokens_seen"] == want["tokens_seen"]
    assert got["aggregate"]["n_prompts"] == want["aggregate"]["n_prompts"] == n_prompts
    assert_close(got["aggregate"], want["aggregate"])
    assert not state_file(out_dir(root) / "massive_activations" / "calibration.json").exists()


def assert_valid_files(root: Path) -> None:
    """Whatever a killed run left is either absent or whole: every JSON file parses."""
    for path in out_dir(root).rglob("*.json"):
        if TMP_MARK not in path.name:
            json.loads(path.read_text())


def status(root: Path, capsys) -> dict:
    capsys.readouterr()
    args = ["status", "--root", str(root), *ARGS[:4], "--layers", "1,2", "--json"]
    assert main(args) == 0
    return json.loads(capsys.readouterr().out)


_REFERENCE: dict[str, Path] = {}


@pytest.fixture
def reference(ray_session, tiny_root, tmp_path_factory, capsys) -> Path:
    """One uninterrupted run per test session, in a copy of the tiny tree. It runs in-process
    on the shared Ray session, the cheaper way to the same pipeline and the same files."""
    if "root" not in _REFERENCE:
        root = copy_tree(tiny_root, tmp_path_factory.mktemp("reference") / "root")
        assert main(["infer", "--root", str(root), *ARGS]) == 0
        capsys.readouterr()
        _REFERENCE["root"] = root
    return _REFERENCE["root"]


# ---------------------------------------------------------------- the tests


def parquet_built(root: Path) -> bool:
    return (out_dir(root) / "parquet" / "projections" / "tests" / "small.parquet").is_file()


@pytest.mark.slow
def test_driver_sigkill_at_several_points_then_resume(reference, tiny_root, tmp_path, capsys):
    root = copy_tree(tiny_root, tmp_path / "root")
    points = [
        # Part way: the model actor writes each batch's responses, then projects it.
        ("the first response file", lambda: n_json(root, "responses") >= 1),
        # In the resumed run: every JSON written, Ray shutting down, Parquet not yet rebuilt.
        ("the last projection file", lambda: n_json(root, "projections") == ALL_PROJECTIONS),
    ]
    for i, (what, ready) in enumerate(points):
        run = Run(root, tmp_path / f"logs{i}")
        run.wait_for(what, ready)
        survivors = run.kill()
        state = n_json(root, "responses"), n_json(root, "projections")
        with capsys.disabled():  # for `pytest -s`: where the kills landed
            print(f"killed at {what}: {state[0]} responses, {state[1]} projection files")
            if survivors:
                print(f"alive 5 s after killing the driver's group: {survivors}")
        assert session_procs(run.sid) == {}, "processes of the killed run survive"
        assert not parquet_built(root), f"killed too late to test a resume at {what}"
        assert i > 0 or state[1] < ALL_PROJECTIONS, f"killed too late to test a resume at {what}"
        assert_valid_files(root)
    # The last run has only the Parquet tables to rebuild: no generation, no projection.
    run = Run(root, tmp_path / "logs-final")
    rc, survivors = run.finish()
    assert rc == 0, run.tail()
    assert not survivors, f"a clean run left processes behind: {survivors}"
    assert "skipped 10 (already complete)" in (tmp_path / "logs-final" / "stdout.txt").read_text()
    assert_same_output(root, reference)
    st = status(root, capsys)
    assert st["responses"]["missing"] == 0 and st["stray_temp_files"] == []
    assert all(t["missing"] == 0 for t in st["projections"].values())
    assert {v["state"] for v in st["parquet"].values()} == {"up to date"}


def first_batch_projected(root: Path) -> bool:
    # ARGS: batches of 2 prompts, each written as one projection file per trait.
    return n_json(root, "projections") >= 2 * len(TRAITS)


@pytest.mark.slow
@pytest.mark.parametrize("lost", ["nothing", "projections"])
def test_killed_run_goes_on_with_its_calibration(ray_session, tiny_root, tmp_path, lost):
    """SIGKILL once the first batch's projections land, then resume: the calibration counts
    every prompt once. The resume projects only the prompts left; the calibration must not be
    rebuilt from those alone. With `lost="projections"` the kill fell between the calibration
    write and the projection writes: the prompts it counted have no projections yet (the
    writer runs after the stage), so they are projected again but not counted again."""
    # Enough batches (of 2) that the kill lands mid-run, however fast the machine; the
    # uninterrupted run of the same prompts, in-process, is the reference.
    texts = [f"{t} {i}" for i in range(4) for t in PROMPTS]
    write_prompt_set(tiny_root, "tests/small", texts)
    ref = copy_tree(tiny_root, tmp_path / "ref")
    assert main(["infer", "--root", str(ref), *ARGS]) == 0
    root = copy_tree(tiny_root, tmp_path / "root")
    run = Run(root, tmp_path / "logs")
    run.wait_for("the first batch's projections", lambda: first_batch_projected(root))
    run.kill()
    assert n_json(root, "projections") < len(texts) * len(TRAITS), "killed too late"
    partial = calibration(root)
    assert partial["complete"] is False and 0 < partial["tokens_seen"]
    if lost == "projections":
        import torch

        from raypipe.store.calibration import state_file

        state = torch.load(
            state_file(out_dir(root) / "massive_activations" / "calibration.json"),
            weights_only=True,
        )
        counted = [pid for _, pid in state["counted"]]
        assert counted
        for trait in TRAITS:
            for pid in counted:
                (out_dir(root) / "projections" / trait / "tests" / "small" / f"{pid}.json").unlink(
                    missing_ok=True
                )
    run = Run(root, tmp_path / "logs-resume")
    rc, _ = run.finish()
    assert rc == 0, run.tail()
    assert_same_output(root, ref, n_prompts=len(texts))


@pytest.mark.slow
def test_calibration_is_collected_where_projections_are_complete(reference, tmp_path, capsys):
    """A calibration lost (or never collected) after every projection was written: the next
    run sends the prompts through the calibration prefill and leaves their files alone."""
    from raypipe.store.calibration import state_file

    root = copy_tree(reference, tmp_path / "root")
    cal = out_dir(root) / "massive_activations" / "calibration.json"
    cal.unlink()
    assert not state_file(cal).exists()
    before = {k: p.read_bytes() for k, p in tree(root).items() if "/projections/" in f"/{k}"}
    assert main(["infer", "--root", str(root), *ARGS]) == 0
    assert f"done 0 | skipped {len(PROMPTS)}" in capsys.readouterr().out
    after = {k: p.read_bytes() for k, p in tree(root).items() if "/projections/" in f"/{k}"}
    assert after == before
    assert_same_calibration(root, reference)


@pytest.mark.slow
def test_killed_projection_worker_is_replaced(reference, tiny_root, tmp_path, capsys):
    """In-process on the shared Ray session (no driver start-up to pay): a watcher thread
    SIGKILLs the model actor's process (generation + projection, FusedStage) once, mid-run;
    Ray Data restarts the actor and retries its batches, so the run completes with the same
    files as an uninterrupted one."""
    root = copy_tree(tiny_root, tmp_path / "root")
    # Model actors of earlier runs on the same session (an idle pooled worker may yet become
    # this run's actor, so only processes that already were one are left out).
    before = {p for p, c in descendants(os.getpid()).items() if "FusedStage" in c}
    killed: dict[str, object] = {}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            # Ray titles the actor `...(FusedStage)).submit` while it maps a batch; failing
            # that, once a response is written the actor is up with batches on their way.
            procs = {
                p: c
                for p, c in descendants(os.getpid()).items()
                if "FusedStage" in c and p not in before
            }
            busy = [p for p, c in procs.items() if ".submit" in c]
            if busy or (procs and n_json(root, "responses") >= 1):
                pid = (busy or list(procs))[0]
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, busy=bool(busy), projected=n_json(root, "projections"))
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        rc = main(["infer", "--root", str(root), *ARGS])
    finally:
        stop.set()
        watcher.join()
    capsys.readouterr()
    with capsys.disabled():
        print(f"killed FusedStage worker: {killed}")
    assert killed, "the run ended before a FusedStage worker was seen"
    assert killed["projected"] < ALL_PROJECTIONS, f"killed after all work was done: {killed}"
    assert rc == 0
    assert killed["pid"] not in descendants(os.getpid())
    assert_same_output(root, reference)


@pytest.mark.slow
def test_prompt_longer_than_context_fails_alone(ray_session, tiny_root, capsys):
    long_text = " ".join(WORDS[i % len(WORDS)] for i in range(300))
    write_prompt_set(tiny_root, "tests/long", PROMPTS[:3] + [long_text])
    base = ["infer", "--root", str(tiny_root), "--experiment", "tiny", "--prompt-set"]
    args = base + ["tests/long", "--dtype", "float32", "--max-new-tokens", "6", "--layers", "1"]
    assert main([*args, "--quiet"]) == 1
    printed = capsys.readouterr().out
    assert "done 3" in printed and "failed 1" in printed
    assert "failed 3: prompt is" in printed and "model context of 256" in printed
    out = out_dir(tiny_root)
    responses = out / "responses" / "tests" / "long"
    assert sorted(p.name for p in responses.glob("*.json")) == ["0.json", "1.json", "2.json"]
    for trait in TRAITS:
        folder = out / "projections" / trait / "tests" / "long"
        assert sorted(p.name for p in folder.glob("*.json")) == ["0.json", "1.json", "2.json"]
    before = {p.name: p.read_bytes() for p in responses.glob("*.json")}
    assert main([*args, "--quiet", "--truncate"]) == 0
    printed = capsys.readouterr().out
    assert "done 1" in printed and "skipped 3" in printed and "failed 0" in printed
    rec = json.loads((responses / "3.json").read_text())
    assert rec["prompt_end"] == 256 - 6 and len(rec["token_ids"]) <= 256
    after = {p.name: p.read_bytes() for p in responses.glob("*.json") if p.name != "3.json"}
    assert after == before  # finished work is never redone
    for trait in TRAITS:
        assert (out / "projections" / trait / "tests" / "long" / "3.json").is_file()
    table = pq.read_table(out / "parquet" / "projections" / "tests" / "long.parquet")
    assert table.num_rows == 4 * len(TRAITS)


# ---------------------------------------------------------------- raypipe status


def write_projection_file(paths, trait: str, pid: str, layers, centered: bool = False) -> None:
    """A projection file as the store writes it, with probe entries at `layers` (no model)."""
    import numpy as np

    from raypipe.store.outputs import (
        VectorInfo,
        projection_entry,
        projection_record,
        write_projection,
    )

    entries = [
        projection_entry(
            VectorInfo(trait, "probe", "response[:]", layer, "layers_arg", 0.0),
            np.arange(4, dtype=np.float32),
            np.ones(4, dtype=np.float32),
            3,
            centered,
        )
        for layer in layers
    ]
    record = projection_record(
        prompt_id=pid,
        prompt_set="tests/small",
        n_prompt_tokens=3,
        n_response_tokens=1,
        component="residual",
        position="response[:]",
        centered=centered,
        entries=entries,
    )
    write_projection(paths.projection_file("base", trait, "tests/small", pid), record)


def test_status_counts_without_ray_or_model(tiny_root, capsys, monkeypatch):
    from raypipe.store.outputs import response_record, write_response
    from raypipe.store.paths import ExperimentPaths

    paths = ExperimentPaths(tiny_root, "tiny")
    monkeypatch.setitem(sys.modules, "ray", None)  # any `import ray` now fails

    def no_model(*a, **k):
        raise AssertionError("status must not load a model")

    monkeypatch.setattr("raypipe.engine.models.load_model", no_model)
    for i in range(4):
        rec = response_record(
            prompt=f"p{i}",
            response="r",
            system_prompt=None,
            tokens=["a", "b"],
            token_ids=[5, 6],
            prompt_end=1,
            model="tiny",
            note=None,
        )
        write_response(paths.response_file("base", "tests/small", str(i)), rec)
    for trait, ids in (("behavior/alpha", "012"), ("tone/beta", "0")):
        for i in ids:
            write_projection_file(paths, trait, i, layers=(1, 2))
    # Counted per (method, layer) entry: a file without layer 2 is not done for --layers 1,2,
    # nor is one written with other settings (uncentered is what this status asks about).
    write_projection_file(paths, "tone/beta", "1", layers=(1,))
    write_projection_file(paths, "tone/beta", "2", layers=(1, 2), centered=True)
    raw = paths.raw_file("base", "residual", "tests/small", "0")
    raw.parent.mkdir(parents=True)
    raw.write_bytes(b"x")
    stray = paths.responses_dir("base", "tests/small") / f".4.json{TMP_MARK}abc123"
    stray.write_text("{half")
    (paths.projections_root("base") / "behavior/alpha/tests/small" / f".7.json{TMP_MARK}x").touch()
    # Parquet: responses rebuilt before a newer response JSON (stale); projections none yet.
    for table in ("responses",):
        target = paths.parquet_file("base", table, "tests/small")
        target.parent.mkdir(parents=True)
        target.write_bytes(b"")
        old = paths.response_file("base", "tests/small", "3").stat().st_mtime - 60
        os.utime(target, (old, old))
    st = status(tiny_root, capsys)
    assert st["prompts"] == 10
    assert st["responses"]["present"] == 4 and st["responses"]["missing"] == 6
    assert st["responses"]["missing_ids"] == [str(i) for i in range(4, 10)]
    assert {t: (v["present"], v["missing"]) for t, v in st["projections"].items()} == {
        "behavior/alpha": (3, 7),
        "tone/beta": (1, 9),
    }
    assert st["raw"] == {"residual": 1}
    assert sorted(Path(s).name for s in st["stray_temp_files"]) == sorted(
        [stray.name, f".7.json{TMP_MARK}x"]
    )
    assert st["parquet"]["responses"]["state"] == "stale"
    assert st["parquet"]["projections"]["state"] == "missing"

    # The text report says the same, and exits 0.
    args = ["status", "--root", str(tiny_root), *ARGS[:4], "--layers", "1,2"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "responses: 4 present, 6 missing [4, 5, 6, 7, 8, 9]" in text
    assert "projections tone/beta: 1 present, 9 missing" in text
    assert "tone/beta: 1 projection file(s) hold entries with centered=True" in text
    assert "stray temp files: 2" in text and "parquet responses: stale" in text
    # The same validation as infer: a layer past the model depth is an error naming it.
    assert main(["status", "--root", str(tiny_root), *ARGS[:4], "--layers", "9"]) == 2
    assert "beyond the model depth: it has 4 layers" in capsys.readouterr().err


# ---------------------------------------------------------------- what a killed writer leaves


def complete_tree(root: Path) -> None:
    """Every response and projection file of tests/small and a complete calibration, written by
    the store (no model): nothing is left for `infer` to do."""
    import numpy as np

    from raypipe.store.calibration import calibration_record, write_calibration
    from raypipe.store.outputs import (
        VectorInfo,
        projection_entry,
        projection_record,
        response_record,
        write_projection,
        write_response,
    )
    from raypipe.store.paths import ExperimentPaths

    paths = ExperimentPaths(root, "tiny")
    result = {"tokens_seen": 4 * len(PROMPTS), "aggregate": {"n_prompts": len(PROMPTS)}}
    record = calibration_record("tiny", "tiny", "base", "test", result)
    write_calibration(paths.calibration_file("base"), record, complete=True)
    for i in range(len(PROMPTS)):
        pid = str(i)
        rec = response_record(
            prompt=PROMPTS[i],
            response="go",
            system_prompt=None,
            tokens=["a", "b", "c", "d"],
            token_ids=[7, 8, 9, 10],
            prompt_end=3,
            model="tiny",
            note=None,
        )
        write_response(paths.response_file("base", "tests/small", pid), rec)
        for trait in TRAITS:
            entries = [
                projection_entry(
                    VectorInfo(trait, "probe", "response[:]", layer, "layers_arg", 0.0),
                    np.arange(4, dtype=np.float32),
                    np.ones(4, dtype=np.float32),
                    3,
                    False,
                )
                for layer in (1, 2)
            ]
            record = projection_record(
                prompt_id=pid,
                prompt_set="tests/small",
                n_prompt_tokens=3,
                n_response_tokens=1,
                component="residual",
                position="response[:]",
                centered=False,
                entries=entries,
            )
            write_projection(paths.projection_file("base", trait, "tests/small", pid), record)


def test_one_unreadable_file_costs_only_itself(tiny_root, capsys):
    complete_tree(tiny_root)
    bad = out_dir(tiny_root) / "responses" / "tests" / "small" / "3.json"
    bad.write_text('{"prompt": "half a file", "token_ids": [1, 2')  # a foreign, broken write
    # Nothing left to generate or project: this run only rebuilds the Parquet tables (no Ray).
    rc = main(["infer", "--root", str(tiny_root), *ARGS])
    captured = capsys.readouterr()
    assert rc == 1, captured.err  # reported as a failure naming the file, not a crash
    assert str(bad) in captured.out
    table = out_dir(tiny_root) / "parquet" / "responses" / "tests" / "small.parquet"
    assert pq.read_table(table).num_rows == len(PROMPTS) - 1


def test_temp_file_of_a_killed_writer_is_swept(tiny_root, capsys):
    import socket

    complete_tree(tiny_root)
    dead = subprocess.Popen(["true"])
    dead.wait()
    folder = out_dir(tiny_root) / "responses" / "tests" / "small"
    # The name atomic.py gives a temp file, with the writer's host and (now dead) pid.
    stray = folder / f".4.json{TMP_MARK}{socket.gethostname()}-{dead.pid}-k1ll3d00"
    stray.write_text('{"half": ')
    assert main(["infer", "--root", str(tiny_root), *ARGS]) == 0
    capsys.readouterr()
    assert not stray.exists()

"""Runs that must not mix or half-write: one run per prompt set at a time, and a read-only or
full tree stops with one line and leaves every file whole."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from raypipe.errors import RaypipeError
from raypipe.store.atomic import TMP_MARK
from raypipe.store.paths import ExperimentPaths
from raypipe.store.runlock import run_lock
from tests.conftest import PROMPTS
from tests.test_resume import ARGS, REPO, Run, n_json, out_dir
from tests.tiny import write_prompt_set

INFER = [sys.executable, "-m", "raypipe.cli", "infer"]


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("raypipe: error:")]


def test_the_lock_goes_with_its_holder(tiny_root):
    """Held, it refuses a second run and names the holder; its holder killed, it is free."""
    paths = ExperimentPaths(tiny_root, "tiny")
    code = (
        "import sys, time; from pathlib import Path; from raypipe.store.paths import "
        "ExperimentPaths; from raypipe.store.runlock import run_lock\n"
        f"with run_lock(ExperimentPaths(Path({str(tiny_root)!r}), 'tiny'), 'base', "
        "'tests/small'):\n    print('held', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == b"held"
        with pytest.raises(RaypipeError, match=f"another raypipe run .*pid {holder.pid} "):
            with run_lock(paths, "base", "tests/small"):
                pass
        with run_lock(paths, "base", "tests/other"):  # another prompt set is not locked
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with run_lock(paths, "base", "tests/small"):
        pass


@pytest.mark.slow
def test_a_second_run_on_the_same_prompt_set_is_refused(tiny_root, tmp_path):
    """Two runs at once with other settings used to interleave their files and both exit 0;
    the second one is refused before it writes anything, and the first one's files agree."""
    # Enough batches that the first run is still writing when the second one starts.
    write_prompt_set(tiny_root, "tests/small", [f"{t} {i}" for i in range(8) for t in PROMPTS])
    first = Run(tiny_root, tmp_path / "first", "--max-new-tokens", "12", "--batch-size", "1")
    first.wait_for("a first response", lambda: n_json(tiny_root, "responses") >= 1)
    second = subprocess.run(
        [*INFER, "--root", str(tiny_root), *ARGS, "--max-new-tokens", "6"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    rc, _ = first.finish()
    assert rc == 0, first.tail()
    assert second.returncode == 2, second.stderr[-2000:]
    errors = _errors(second.stderr)
    assert len(errors) == 1 and f"pid {first.proc.pid} " in errors[0], second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    base = out_dir(tiny_root)
    responses = {p.stem: json.loads(p.read_text()) for p in base.glob("responses/**/*.json")}
    assert len(responses) == 80
    assert any(len(r["token_ids"]) - r["prompt_end"] > 6 for r in responses.values())
    for path in base.glob("projections/**/*.json"):
        meta = json.loads(path.read_text())["metadata"]
        response = responses[path.stem]
        assert meta["n_prompt_tokens"] == response["prompt_end"], path
        assert meta["n_prompt_tokens"] + meta["n_response_tokens"] == len(response["token_ids"])


# ---------------------------------------------------------------- read-only and full trees


def _mount_ns_reason() -> str | None:
    if not shutil.which("unshare"):
        return "needs unshare"
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"no mount namespace: {probe.stderr.strip()}"


def _in_mount_ns(setup: str, root: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`raypipe infer` on `root` after `setup` ran in a mount namespace of its own (as root:
    a read-only bind mount, a tiny tmpfs), so nothing here leaks onto the machine."""
    reason = _mount_ns_reason()
    if reason:
        pytest.skip(reason)
    infer = " ".join([*INFER, "--root", str(root), *ARGS])
    return subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", f"{setup} && exec {infer}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_read_only_tree_stops_before_ray_starts(tiny_root):
    before = _snapshot(tiny_root)
    run = _in_mount_ns(
        f"mount --bind {tiny_root} {tiny_root} && mount -o remount,ro,bind {tiny_root} {tiny_root}",
        tiny_root,
    )
    assert run.returncode == 2, run.stderr[-2000:]
    errors = _errors(run.stderr)
    assert len(errors) == 1 and "Read-only file system" in errors[0], run.stderr[-2000:]
    assert "Token authentication" not in run.stderr  # Ray's first words: it never started
    assert _snapshot(tiny_root) == before


@pytest.mark.parametrize("free_kb", [0, 40], ids=["full-at-start", "full-mid-run"])
def test_a_full_disk_is_one_line_and_leaves_whole_files(tiny_root, tmp_path, free_kb):
    """A full disk at the start stops before Ray starts; one that fills during the run stops
    it with one line naming the file, no traceback, and no half-written or temp file."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    tree = mnt / "tree"
    fill = (
        f"mount -t tmpfs -o size=3m tmpfs {mnt} && mkdir {tree} && "
        f"cp -r {tiny_root}/experiments {tiny_root}/datasets {tree}/ && "
        f"free=$(df -k {mnt} | tail -1 | awk '{{print $4}}') && "
        f"(dd if=/dev/zero of={mnt}/fill bs=1k count=$((free - {free_kb})) 2>/dev/null; true)"
    )
    run = _in_mount_ns(fill, tree)
    assert run.returncode == 2, run.stderr[-3000:]
    errors = _errors(run.stderr)
    assert len(errors) == 1 and "No space left on device" in errors[0], run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    if free_kb:
        assert "cannot write" in errors[0] and "/inference/" in errors[0]


def test_a_run_that_fills_the_disk_leaves_no_half_file(tiny_root, tmp_path):
    """The files of a run stopped by a full disk parse, and no temp file is left."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = tmp_path / "left"
    tree = mnt / "tree"
    setup = (
        f"mount -t tmpfs -o size=3m tmpfs {mnt} && mkdir {tree} && "
        f"cp -r {tiny_root}/experiments {tiny_root}/datasets {tree}/ && "
        f"free=$(df -k {mnt} | tail -1 | awk '{{print $4}}') && "
        f"(dd if=/dev/zero of={mnt}/fill bs=1k count=$((free - 40)) 2>/dev/null; true) && "
        f"trap 'cp -r {tree}/experiments {out}' EXIT && {' '.join(INFER)} --root {tree} "
        f"{' '.join(ARGS)}; true"
    )
    reason = _mount_ns_reason()
    if reason:
        pytest.skip(reason)
    subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", setup],
        cwd=REPO,
        capture_output=True,
        timeout=300,
    )
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files, "nothing came back out of the namespace"
    assert not [p for p in files if TMP_MARK in p.name]
    for p in files:
        if p.suffix == ".json":
            json.loads(p.read_text())  # whole, or not there at all
    assert os.path.isdir(out / "tiny" / "inference")

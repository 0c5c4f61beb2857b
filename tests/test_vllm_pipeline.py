"""`raypipe infer --backend vllm` end to end through Ray on the embedded model: one vLLM engine
generates and projects, a SIGKILLed driver's run resumes, new layers re-project on vLLM, and
the files equal the HF backend's (same ids, scores within 1e-4 relative in fp32)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.test_resume import session_procs
from tests.tiny import write_prompt_set, write_vectors

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TRAITS = ["tone/alpha", "mood/beta"]
PROMPTS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write one sentence about the sea.",
    "How do plants grow?",
    "Say hello in French.",
    "Why is the sky blue? Answer briefly.",
    # More blocks than the engine takes at once (4 of 2 rows): a kill after the first
    # response file still lands with work left to resume.
    "Count to five.",
    "What is a cat?",
    "Name a fruit.",
    "What colour is grass?",
    "Give me a word that rhymes with day.",
    "What is two plus two?",
    "Name a big city.",
    "What do bees make?",
]
BASE = ["--experiment", "emb", "--prompt-set", "tests/few", "--dtype", "float32"]
BASE += ["--max-new-tokens", "12", "--batch-size", "2", "--quiet"]
TIMEOUT = 600  # seconds per run on a loaded 2-core machine


def out_dir(root: Path) -> Path:
    return root / "experiments" / "emb" / "inference" / "instruct"


def n_json(root: Path, kind: str) -> int:
    folder = out_dir(root) / kind
    return sum(1 for p in folder.rglob("*.json") if ".tmp" not in p.name) if folder.is_dir() else 0


@pytest.fixture
def emb_root(tmp_path) -> Path:
    exp = tmp_path / "experiments" / "emb"
    exp.mkdir(parents=True)
    (exp / "config.json").write_text(
        json.dumps(
            {
                "defaults": {"extraction": "instruct", "application": "instruct"},
                "model_variants": {"instruct": {"model": "smollm2-135m-instruct"}},
                "use_chat_template": True,
            }
        )
    )
    write_vectors(exp, TRAITS, n_layers=30, hidden=576, variant="instruct")
    write_prompt_set(tmp_path, "tests/few", PROMPTS)
    return tmp_path


def run(root: Path, logs: Path, *extra: str) -> subprocess.Popen:
    """`raypipe infer` in a session of its own (its own local Ray), to be killed whole."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_ADDRESS="local", VLLM_CPU_KVCACHE_SPACE="1")
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "raypipe.cli", "infer", "--root", str(root), *BASE, *extra]
    with open(logs / "out.txt", "wb") as out, open(logs / "err.txt", "wb") as err:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True
        )


def kill_session(proc: subprocess.Popen, grace: float = 10) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + grace
    while session_procs(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = session_procs(proc.pid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes of the killed run survive: {left}"


def entries(root: Path) -> dict[tuple, dict]:
    """{(trait, prompt id, method, layer): entry} of every projection file."""
    out = {}
    for path in (out_dir(root) / "projections").rglob("*.json"):
        rec = json.loads(path.read_text())
        trait = str(path.relative_to(out_dir(root) / "projections")).split("/tests/")[0]
        for e in rec["projections"]:
            out[(trait, rec["metadata"]["prompt_id"], e["method"], e["layer"])] = e
    return out


def responses(root: Path) -> dict[str, list[int]]:
    return {
        p.stem: json.loads(p.read_text())["token_ids"]
        for p in (out_dir(root) / "responses").rglob("*.json")
    }


def assert_close(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, e in got.items():
        w = want[key]
        for part in ("prompt", "response"):
            a, b = np.array(e[part]), np.array(w[part])
            assert a.shape == b.shape, key
            scale = max(np.abs(b).max(), 1e-6)
            assert np.abs(a - b).max() / scale < 1e-4, (key, part)
            a, b = np.array(e["token_norms"][part]), np.array(w["token_norms"][part])
            assert np.abs(a - b).max() / np.abs(b).max() < 1e-4, (key, "norms", part)


def test_infer_backend_vllm_resumes_after_sigkill(emb_root, tmp_path):
    # The HF reference (--backend local): layers 3, 20 and 25. Every run has a Ray of its own,
    # one at a time.
    ref = tmp_path / "ref"
    shutil.copytree(emb_root, ref)
    hf = run(ref, tmp_path / "logs-hf", "--layers", "3,20,25")
    assert hf.wait(TIMEOUT) == 0, (tmp_path / "logs-hf" / "err.txt").read_text()[-3000:]

    root = emb_root
    first = run(root, tmp_path / "logs0", "--backend", "vllm", "--layers", "3,20")
    deadline = time.monotonic() + TIMEOUT
    while n_json(root, "responses") < 1:
        assert first.poll() is None, (tmp_path / "logs0" / "err.txt").read_text()[-3000:]
        assert time.monotonic() < deadline, "no response file in time"
        time.sleep(0.1)
    kill_session(first)
    done = n_json(root, "responses"), n_json(root, "projections")
    print(f"killed after {done[0]} responses, {done[1]} projection files")
    assert done[0] < len(PROMPTS), "killed too late to test a resume"

    second = run(root, tmp_path / "logs1", "--backend", "vllm", "--layers", "3,20")
    assert second.wait(TIMEOUT) == 0, (tmp_path / "logs1" / "err.txt").read_text()[-3000:]
    assert "done" in (tmp_path / "logs1" / "out.txt").read_text()
    assert responses(root) == responses(ref), "vLLM's greedy ids differ from HF's"
    want = {k: v for k, v in entries(ref).items() if k[3] in (3, 20)}
    assert_close(entries(root), want)

    # A new layer: existing responses re-projected by a prefill on vLLM, nothing generated.
    third = run(root, tmp_path / "logs2", "--backend", "vllm", "--layers", "3,20,25")
    assert third.wait(TIMEOUT) == 0, (tmp_path / "logs2" / "err.txt").read_text()[-3000:]
    assert_close(entries(root), entries(ref))
    assert responses(root) == responses(ref)

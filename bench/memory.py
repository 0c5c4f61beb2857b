"""Peak RSS of the driver and of the Ray workers of `raypipe infer` for N and 10N prompts."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a bare checkout too

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


def session_rss(sid: int) -> dict[int, tuple[str, int]]:
    """pid -> (command line, RSS bytes) for every live process in session `sid`, from /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            if int(fields[3]) != sid or fields[0] in "ZX":
                continue
            rss = int(Path(f"/proc/{entry}/statm").read_text().split()[1]) * PAGE
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        out[int(entry)] = (cmd.strip(), rss)
    return out


def telling(old: str, new: str) -> str:
    """A worker starts as `python .../default_worker.py ...`, Ray retitles it `ray::IDLE`, then
    `ray::<actor>` (`ray::<actor>.<method>` while busy) or `ray::<task>`: keep the actor or
    task title, the shortest of those seen."""

    def rank(cmd: str) -> int:
        if not cmd.startswith("ray::"):
            return 0
        return 1 if cmd.startswith("ray::IDLE") else 2

    if rank(new) != rank(old):
        return new if rank(new) > rank(old) else old
    return new if len(new) < len(old) else old


def kind(pid: int, driver: int, cmd: str) -> str:
    if pid == driver:
        return "driver"
    # Ray titles worker processes `ray::<actor or task>` (idle ones `ray::IDLE`); its node
    # agents take such titles too, but they are part of Ray itself, like gcs and raylet.
    if cmd.startswith("ray::") and "Agent" not in cmd.split(" ")[0]:
        return "workers"
    return "ray_system"


def build_root(base: Path, model: Path, n: int, seed: int) -> Path:
    from tests.tiny import WORDS, write_prompt_set, write_vectors

    root = base / f"n{n}"
    exp = root / "experiments" / "tiny"
    exp.mkdir(parents=True)
    config = {
        "defaults": {"extraction": "base", "application": "base"},
        "model_variants": {"base": {"model": str(model)}},
    }
    (exp / "config.json").write_text(json.dumps(config))
    write_vectors(exp, ["behavior/alpha", "tone/beta"], n_layers=4, hidden=64)
    rng = random.Random(seed)
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(5, 40))) for _ in range(n)]
    write_prompt_set(root, "bench/synthetic", texts)
    return root


def infer_command(root: Path, max_new_tokens: int, batch_size: int, *extra: str) -> list[str]:
    """`raypipe infer` on a tree of build_root: the tiny model, 2 traits x layers 1 and 2."""
    return [
        sys.executable,
        "-m",
        "raypipe.cli",
        "infer",
        "--root",
        str(root),
        "--experiment",
        "tiny",
        "--prompt-set",
        "bench/synthetic",
        "--dtype",
        "float32",
        "--max-new-tokens",
        str(max_new_tokens),
        "--batch-size",
        str(batch_size),
        "--layers",
        "1,2",
        *extra,
    ]


def measure(root: Path, args, interval: float) -> dict:
    cmd = infer_command(root, args.max_new_tokens, args.batch_size, "--quiet")
    env = dict(os.environ, HF_HUB_OFFLINE="1", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env["RAY_ADDRESS"] = "local"  # a Ray of its own, whose processes all sit in our session
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    peaks: dict[int, tuple[str, int]] = {}
    stderr = []
    reader = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        for pid, (cmdline, rss) in session_rss(proc.pid).items():
            name, peak = peaks.get(pid, (cmdline, 0))
            peaks[pid] = (telling(name, cmdline), max(peak, rss))
        time.sleep(interval)
    seconds = time.perf_counter() - start
    reader.join(5)
    # Whatever outlived a clean exit (it should be nothing) goes now, by pid.
    for pid in session_rss(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.returncode != 0:
        tail = b"".join(stderr).decode(errors="replace")[-3000:]
        raise SystemExit(f"infer failed ({proc.returncode}) on {root}:\n{tail}")
    sums = {"driver": 0, "workers": 0, "ray_system": 0}
    counts = dict.fromkeys(sums, 0)
    biggest = {}
    for pid, (name, peak) in peaks.items():
        k = kind(pid, proc.pid, name)
        sums[k] += peak
        counts[k] += 1
        if k == "workers":
            label = name.split(" ")[0]
            biggest[label] = max(biggest.get(label, 0), peak)
    return {"seconds": seconds, "counts": counts, **sums, "per_worker": biggest}


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=40, help="prompts in the small run (the other: 10N)")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64, help="as `infer --batch-size` [64]")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    p.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tests.tiny import save_tiny_model

    base = Path(tempfile.mkdtemp(prefix="raypipe-memory-"))
    try:
        model = save_tiny_model(base / "model")
        sizes = (args.n, 10 * args.n)
        results = {n: measure(build_root(base, model, n, n), args, args.interval) for n in sizes}
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    small, large = (results[n] for n in sizes)
    labels = {
        "driver": "driver",
        "workers": "workers (sum of maxima)",
        "ray_system": "gcs, raylet, agents (sum of maxima)",
    }
    print(f"{'peak RSS, MiB':<44}{f'N={sizes[0]}':>10}{f'N={sizes[1]}':>10}{'ratio':>8}")
    for key, label in labels.items():
        a, b = small[key] / MIB, large[key] / MIB
        print(f"{label:<44}{a:>10.0f}{b:>10.0f}{ratio(b, a):>8.2f}")
    for name in sorted(set(small["per_worker"]) | set(large["per_worker"])):
        a = small["per_worker"].get(name, 0) / MIB
        b = large["per_worker"].get(name, 0) / MIB
        print(f"  largest {name[:34]:<34}{a:>10.0f}{b:>10.0f}")
    for key, label in labels.items():
        a, b = small["counts"][key], large["counts"][key]
        print(f"{'processes: ' + label.split(' (')[0]:<44}{a:>10}{b:>10}")
    print(f"{'wall seconds':<44}{small['seconds']:>10.1f}{large['seconds']:>10.1f}")
    print(
        json.dumps(
            {
                "rss_ratio_driver": round(ratio(large["driver"], small["driver"]), 3),
                "rss_ratio_workers": round(ratio(large["workers"], small["workers"]), 3),
                "n": args.n,
            }
        )
    )


if __name__ == "__main__":
    main()

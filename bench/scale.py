"""How `raypipe infer` scales with the number of prompts: the same tiny random model (4 layers,
hidden 64), 2 traits x 2 layers, 4 new tokens, at 2,000, 20,000 and 100,000 prompts.

Each size runs `raypipe infer` in a process of its own on a fresh tree and reports, side by
side: prompts per second over the whole run, the seconds from the last finished batch (the
driver's last progress line) to the process's exit, and the driver's peak RSS (VmHWM). The
last line is one JSON object of ratios:
- per_prompt_ratio: time per prompt at the largest size / at the smallest (target <= 1.2)
- driver_rss_ratio: driver peak RSS at the largest size / at the smallest (target <= 1.3)
- tail_fraction: after-last-batch time / run time at the largest size (target <= 0.02)
- prompts_per_s: at the largest size (target >= 300 on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory import build_root, infer_command, session_rss  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def _vm_hwm(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run(root: Path, n: int, args) -> dict:
    cmd = infer_command(root, args.max_new_tokens, args.batch_size, *args.extra)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    last_batch = [start]
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("[raypipe] ") and " prompts | " in line:
                last_batch[0] = time.monotonic()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _vm_hwm(proc.pid))
        time.sleep(args.interval)
    end = time.monotonic()
    reader.join(5)
    for pid in session_rss(proc.pid):  # what outlived a clean exit (it should be nothing)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.returncode != 0:
        raise SystemExit(f"infer failed ({proc.returncode}) at {n}:\n{''.join(lines)[-3000:]}")
    seconds = end - start
    return {
        "n": n,
        "seconds": seconds,
        "prompts_per_s": n / seconds,
        "tail_s": end - last_batch[0],
        "driver_rss": peak,
    }


def as_format(path: Path, fmt: str) -> None:
    """The same items in a .jsonl or .parquet file instead of the .json one."""
    if fmt == "json":
        return
    data = json.loads(path.read_text())
    items = data["prompts"] if isinstance(data, dict) else data
    if fmt == "jsonl":
        path.with_suffix(".jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = sorted({k for i in items for k in i})
        table = pa.table({c: [str(i[c]) if c == "id" else i.get(c) for i in items] for c in cols})
        pq.write_table(table, path.with_suffix(".parquet"))
    path.unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2000,20000,100000", help="prompt counts, comma list")
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--interval", type=float, default=0.1, help="seconds between RSS samples")
    p.add_argument("--keep", action="store_true", help="keep the temp folder")
    p.add_argument(
        "--prompt-format",
        choices=("json", "jsonl", "parquet"),
        default="json",
        help="the prompt set's file: one JSON document, or read by the workers in parts",
    )
    p.add_argument("extra", nargs="*", help="more `raypipe infer` flags (after --)")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tests.tiny import save_tiny_model

    sizes = [int(s) for s in args.sizes.split(",")]
    base = Path(tempfile.mkdtemp(prefix="raypipe-scale-"))
    try:
        model = save_tiny_model(base / "model")
        results = []
        for n in sizes:
            root = build_root(base, model, n, n)
            as_format(
                root / "datasets" / "inference" / "bench" / "synthetic.json", args.prompt_format
            )
            results.append(run(root, n, args))
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    print(f"{'prompts':>10}{'seconds':>10}{'prompts/s':>11}{'tail s':>9}{'driver MiB':>12}")
    for r in results:
        print(
            f"{r['n']:>10,}{r['seconds']:>10.1f}{r['prompts_per_s']:>11.1f}"
            f"{r['tail_s']:>9.2f}{r['driver_rss'] / MIB:>12.0f}"
        )
    small, large = results[0], results[-1]
    print(
        json.dumps(
            {
                "per_prompt_ratio": round(
                    (large["seconds"] / large["n"]) / (small["seconds"] / small["n"]), 3
                ),
                "driver_rss_ratio": round(large["driver_rss"] / small["driver_rss"], 3),
                "tail_fraction": round(large["tail_s"] / large["seconds"], 4),
                "prompts_per_s": round(large["prompts_per_s"], 1),
                "sizes": sizes,
                "prompt_format": args.prompt_format,
            }
        )
    )


if __name__ == "__main__":
    main()

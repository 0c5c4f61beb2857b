"""The CPU allocator settings: taken by glibc, and freed tensor memory is reused, not re-faulted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocate, touch and free a 64 MiB tensor ten times; count the minor page faults it took.
# The first passes may still grow the heap (a freed aligned block can be a little short of the
# next request until free neighbours coalesce), so they are left out.
PROBE = """
import resource, sys, torch
from raypipe.engine.hostmem import tune_host_allocator
tuned = tune_host_allocator() if sys.argv[1] == "tune" else False
for _ in range(20):
    torch.ones(16 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 << 20)  # 64 MiB of float32, written once
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(mode: str, **env) -> tuple[bool, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_tuned_allocator_reuses_freed_tensor_memory():
    tuned, faults = probe("tune")
    plain, plain_faults = probe("plain")
    off, off_faults = probe("tune", RAYPIPE_MALLOC_TUNING="0")
    assert tuned and not plain and not off
    # glibc hands a 64 MiB block back on free, so every pass faults its 16k pages in again.
    assert plain_faults > 10 * 16384 * 0.9 and off_faults > 10 * 16384 * 0.9
    assert faults < plain_faults / 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_load_model_on_cpu_tunes_the_allocator(tmp_path):
    from tests.tiny import save_tiny_model

    folder = save_tiny_model(tmp_path / "tiny")
    code = (
        "import sys; from pathlib import Path\n"
        "from raypipe.engine import hostmem\n"
        "from raypipe.engine.models import ModelSpec, load_model\n"
        "assert hostmem._tuned is None\n"
        "load_model(ModelSpec(sys.argv[1], Path(sys.argv[2]), device='cpu'))\n"
        "print(hostmem._tuned)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(folder), str(tmp_path / "cache")],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "True"

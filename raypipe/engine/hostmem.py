"""Host allocator settings for CPU inference: keep freed tensor memory in the process.

glibc's malloc serves large blocks with mmap and gives them back on free, and trims the top of
the heap as soon as a little is free. A forward pass allocates and frees tens of MiB per op, so
every batch faults its working memory in again, page by page: about 290k minor page faults per
forward of 4k tokens through the embedded 135M model, which then ran about 1.2x as long as with
the thresholds below; on the benchmark prompts' smaller batches prefill ran 1.07x and generation
1.05x as long (bench/allocator.py). The settings change where memory comes from, never what is
computed, so results are bit-identical.

Set RAYPIPE_MALLOC_TUNING=0 to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt parameters (malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD = 256 << 20  # blocks up to this size come from the heap and are reused
TRIM_THRESHOLD = 512 << 20  # free memory kept at the top of the heap before giving it back
TOP_PAD = 64 << 20  # extra grown per heap extension, so it grows in few steps

_tuned: bool | None = None


def tune_host_allocator() -> bool:
    """Apply the thresholds once per process; True if glibc took them."""
    global _tuned
    if _tuned is not None:
        return _tuned
    _tuned = False
    if os.environ.get("RAYPIPE_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return _tuned
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return _tuned
    if not hasattr(libc, "gnu_get_libc_version"):  # glibc only: musl ignores mallopt
        return _tuned
    settings = (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
        (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
        (M_TOP_PAD, TOP_PAD),
    )
    _tuned = all([libc.mallopt(param, value) == 1 for param, value in settings])
    return _tuned

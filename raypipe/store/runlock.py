"""One run at a time per experiment, variant and prompt set: a lock held while a run writes.

Two runs with different settings on the same prompt set would interleave their files (a
projection of one run's response beside the other's response JSON) and both exit 0. The lock
is an flock on a file in the variant's inference folder: the kernel drops it when its holder
exits, however it exits, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from raypipe.errors import RaypipeError
from raypipe.store.paths import ExperimentPaths


def lock_file(paths: ExperimentPaths, variant: str, prompt_set: str) -> Path:
    return paths.inference_dir(variant) / ".locks" / f"{prompt_set}.lock"


def _writable(path: Path, what: str) -> Path:
    """mkdir -p, turning a read-only or full filesystem into one line naming the folder."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RaypipeError(f"{path}: cannot write {what} here: {e.strerror}") from None
    return path


@contextmanager
def run_lock(paths: ExperimentPaths, variant: str, prompt_set: str) -> Iterator[Path]:
    """Hold the prompt set's lock for the body; a run that finds it held is refused with who
    holds it. Taking it also proves the output tree writable (read-only, full disk) before
    Ray starts or a model loads."""
    path = lock_file(paths, variant, prompt_set)
    _writable(path.parent, "outputs")
    try:
        fh = open(path, "a+")  # noqa: SIM115 (held for the body)
    except OSError as e:
        raise RaypipeError(f"{path}: cannot write outputs here: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise RaypipeError(
                f"{paths.experiment}/{variant}/{prompt_set}: another raypipe run is writing this "
                f"prompt set ({holder}); wait for it to end, or stop it, then run again"
            ) from None
        try:
            fh.seek(0)
            fh.truncate()
            fh.write(
                f"pid {os.getpid()} on {socket.gethostname()}, since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n"
            )
            fh.flush()
            os.fsync(fh.fileno())
        except OSError as e:
            raise RaypipeError(f"{path}: cannot write outputs here: {e.strerror}") from None
        yield path
        try:
            fh.seek(0)
            fh.truncate()  # nobody holds it now (a killed holder's line stays, and is overwritten)
        except OSError:
            pass
    finally:
        fh.close()  # releases the flock

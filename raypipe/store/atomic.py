"""The one place files are written: temp file in the target folder, fsync, then rename."""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from raypipe.errors import OutputError

TMP_MARK = ".tmp-"
STALE_TEMP_S = 24 * 3600  # a temp file this old is abandoned whoever wrote it


_HOST: tuple[int, str] | None = None  # (pid, host name) of this process


def _tmp_prefix(path: Path) -> str:
    # Host and pid name the writer, so a later run can tell an abandoned temp file (its writer
    # was killed) from one being written right now by another process.
    global _HOST
    if _HOST is None or _HOST[0] != os.getpid():
        _HOST = (os.getpid(), socket.gethostname())
    return f".{path.name}{TMP_MARK}{_HOST[1]}-{_HOST[0]}-"


_TEMP_FLAGS = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | os.O_CLOEXEC


def _reason(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else str(e)


def _open_temp(path: Path) -> tuple[int, str]:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix = _tmp_prefix(path)
        # What tempfile.mkstemp does, less its overhead (a third of a millisecond a file).
        for _ in range(100):
            name = str(path.parent / f"{prefix}{secrets.token_hex(4)}")
            try:
                return os.open(name, _TEMP_FLAGS, 0o600), name
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, "no unused temp file name", str(path.parent))
    except OSError as e:
        raise OutputError(path, _reason(e)) from e


def _atomic(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    fd, tmp = _open_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        # A crash (or KeyboardInterrupt) must not leave a half-written file behind.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            # A full disk, a read-only tree: one line naming the file (it reaches the CLI
            # intact from a Ray worker, where a bare OSError loses its file name).
            raise OutputError(path, _reason(e)) from e
        raise
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    return _atomic(path, lambda fh: fh.write(data))


def write_json(path: Path, obj: Any) -> Path:
    return write_bytes(path, dumps_compact(obj).encode("utf-8"))


def write_json_files(files: list[tuple[Path, Any]]) -> None:
    """Several JSON files, each atomic (temp file, fsync, rename) as write_json makes it. The
    filesystem commits them together: one syncfs of each filesystem they are on, then their
    fsyncs side by side, which then find little left to write but still report each file's
    error (64 small files on ext4 here: 31 ms with side-by-side fsyncs alone, 14 ms after a
    syncfs; 48 ms one after another). A crash leaves each file whole or absent."""
    temps: list[tuple[int, str, Path]] = []
    at = None
    try:
        for path, obj in files:
            at = Path(path)
            data = dumps_compact(obj).encode("utf-8")
            fd, tmp = _open_temp(at)
            temps.append((fd, tmp, at))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        if len(temps) > 1:
            _syncfs([fd for fd, _, _ in temps])
        for got in _fsync_pool().map(_fsync_or_error, temps):
            if got is not None:
                at, e = got
                raise e
        while temps:
            fd, tmp, at = temps[0]
            temps[0] = (-1, tmp, at)
            os.close(fd)
            os.replace(tmp, at)
            temps.pop(0)
    except BaseException as e:
        for fd, tmp, _ in temps:  # not renamed yet: none of them becomes visible
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        if isinstance(e, OSError) and at is not None:
            raise OutputError(at, _reason(e)) from e
        raise


_LIBC: Any = None


def _syncfs(fds: list[int]) -> None:
    """syncfs(2) once per filesystem of `fds` (Linux); elsewhere, or where it fails, nothing:
    the fsyncs that follow it do the whole work, and report any error."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL(None, use_errno=True).syncfs
        except (OSError, AttributeError):  # not Linux (no syncfs), or no C library to call
            _LIBC = False
    if _LIBC is False:
        return
    seen = set()
    for fd in fds:
        dev = os.fstat(fd).st_dev
        if dev not in seen:
            seen.add(dev)
            _LIBC(fd)


def _fsync_or_error(temp: tuple[int, str, Path]):
    try:
        os.fsync(temp[0])
    except OSError as e:
        return temp[2], e
    return None


_POOL = None


def _fsync_pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max_workers=16, thread_name_prefix="raypipe-fsync")
    return _POOL


# allow_nan=False: a NaN score is a bug upstream, and must not become invalid JSON. No indent:
# the C encoder (with an indent, json.dumps runs its pure-Python one, 2-3x slower).
_one_line = json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode
_KEYWORDS = {True: "true", False: "false", None: "null"}


def dumps_compact(obj: Any, indent: int = 2) -> str:
    """trait-interp's layout (its utils/json.py `dump_compact`): objects and lists of objects
    indented, a list of numbers or strings on one line. The lines come from the C encoder, so
    the bulk of a file (its score arrays) costs what one-line JSON costs."""

    def enc(o: Any, level: int) -> str:
        if isinstance(o, dict):
            if not o:
                return "{}"
            pad = "\n" + " " * (indent * (level + 1))
            body = ",".join(f"{pad}{_one_line(_key(k))}: {enc(v, level + 1)}" for k, v in o.items())
            return "{" + body + "\n" + " " * (indent * level) + "}"
        if isinstance(o, list | tuple):
            if not any(isinstance(v, dict | list | tuple) for v in o):
                return _one_line(o)
            pad = "\n" + " " * (indent * (level + 1))
            body = ",".join(f"{pad}{enc(v, level + 1)}" for v in o)
            return "[" + body + "\n" + " " * (indent * level) + "]"
        return _one_line(o)

    return enc(obj, 0)


def _key(k: Any) -> str:
    """A dict key as json.dumps writes it."""
    if isinstance(k, str):
        return k
    if isinstance(k, bool) or k is None:
        return _KEYWORDS[k]
    if isinstance(k, int | float):
        return _one_line(k)
    raise TypeError(f"keys must be str, int, float, bool or None, not {type(k).__name__}")


def write_tensor(path: Path, obj: Any) -> Path:
    import torch

    return _atomic(path, lambda fh: torch.save(obj, fh))


def write_with(path: Path, write: Callable[[str], None]) -> Path:
    """For writers that need a file name (pyarrow): `write(tmp_name)` fills it, then rename."""
    temp = TempFile(path)
    try:
        write(temp.name)
    except BaseException as e:
        temp.discard()
        if isinstance(e, OSError):
            raise OutputError(temp.path, _reason(e)) from e
        raise
    return temp.commit()


class TempFile:
    """A temp file beside `path` that a writer fills over time (by name), then `commit`s
    (fsync, rename into place) or `discard`s; a killed writer's is swept by the next run."""

    def __init__(self, path: Path):
        self.path = Path(path)
        fd, self.name = _open_temp(self.path)
        os.close(fd)

    def commit(self) -> Path:
        try:
            fd = os.open(self.name, os.O_RDONLY)
            try:
                os.fsync(fd)  # on disk before the rename makes it visible
            finally:
                os.close(fd)
            os.replace(self.name, self.path)
        except OSError as e:
            self.discard()
            raise OutputError(self.path, _reason(e)) from e
        return self.path

    def discard(self) -> None:
        try:
            os.unlink(self.name)
        except FileNotFoundError:
            pass


def _abandoned(path: Path, now: float) -> bool:
    try:
        if now - path.stat().st_mtime > STALE_TEMP_S:
            return True
    except FileNotFoundError:
        return False
    try:
        host, pid, _ = path.name.split(TMP_MARK, 1)[1].rsplit("-", 2)
        pid = int(pid)
    except ValueError:
        return False  # a name without host and pid: only its age tells
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def sweep_temp_files(folders) -> list[Path]:
    """Remove temp files whose writer is gone (killed mid-write); returns what was removed."""
    now, removed = time.time(), []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if TMP_MARK in p.name and p.name.startswith(".") and _abandoned(p, now):
                try:
                    p.unlink()
                    removed.append(p)
                except FileNotFoundError:
                    pass
    return removed


def read_json(path: Path, field: str = "file") -> Any:
    """Parse a JSON file; any problem becomes an InputError naming the file."""
    from raypipe.errors import InputError

    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(path, field, "file not found") from None
    except OSError as e:
        raise InputError(path, field, f"cannot read: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(path, field, f"not valid UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(path, f"line {e.lineno}", f"malformed JSON: {e.msg}") from None
    except RecursionError:
        raise InputError(path, "file", "malformed JSON: nested too deeply") from None
    except ValueError:  # Python's limit on integer digits (4300 by default)
        raise InputError(path, "file", "malformed JSON: a number with too many digits") from None

"""The one place files are written: temp file in the target folder, fsync, then rename."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TMP_MARK = ".tmp-"


def _atomic(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A crash (or KeyboardInterrupt) must not leave a half-written file behind.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_bytes(path: Path, data: bytes) -> Path:
    return _atomic(path, lambda fh: fh.write(data))


def write_json(path: Path, obj: Any, indent: int | None = 2) -> Path:
    # allow_nan=False: a NaN score is a bug upstream, and must not become invalid JSON.
    text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False)
    return write_bytes(path, text.encode("utf-8"))


def write_tensor(path: Path, obj: Any) -> Path:
    import torch

    return _atomic(path, lambda fh: torch.save(obj, fh))


def write_with(path: Path, write: Callable[[str], None]) -> Path:
    """For writers that need a file name (pyarrow): `write(tmp_name)` fills it, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


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
    except (RecursionError, ValueError) as e:  # absurd nesting, or a 5000-digit integer
        raise InputError(path, "file", f"malformed JSON: {type(e).__name__}") from None

"""User-facing errors: each prints as one line naming the file and field, and exits non-zero."""

from __future__ import annotations

from pathlib import Path


class RaypipeError(Exception):
    """An error caused by the user's input or environment, shown without a traceback."""


class InputError(RaypipeError):
    """Bad input in a file (or flag): names where, which field, and what is wrong."""

    def __init__(self, where: str | Path, field: str, message: str):
        self.where = str(where)
        self.field = field
        self.message = message
        super().__init__(f"{self.where}: {field}: {message}")


class MissingDependency(RaypipeError):
    """An optional package is needed for the requested feature."""

    def __init__(self, package: str, feature: str, extra: str):
        super().__init__(f"{feature} needs the '{package}' package: pip install 'raypipe[{extra}]'")

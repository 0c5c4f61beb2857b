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

    def __reduce__(self):
        # Raised in a Ray worker, it is pickled to the driver (whose Ray Data may have
        # appended notes to args): rebuild it from its fields, whole and in one line.
        return (type(self), (self.where, self.field, self.message))


# `where` of an error about an option value rather than a file: the CLI prints the flag there.
OPTIONS = "options"


class OptionError(InputError):
    """A bad option value or pair of values, named by its field (`dtype`, `tp`), never by a CLI
    flag: the CLI maps fields to its flags when it prints one. The message names any other
    option it involves in backticks (`tp`), which the CLI prints as that option's flag."""

    def __init__(self, field: str, message: str):
        super().__init__(OPTIONS, field, message)

    def __reduce__(self):
        return (type(self), (self.field, self.message))


class OutputError(RaypipeError):
    """A file could not be written: a read-only tree, a full disk, a folder that vanished."""

    def __init__(self, path: str | Path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{self.path}: cannot write: {reason}")

    def __reduce__(self):
        return (type(self), (self.path, self.reason))


class MissingDependency(RaypipeError):
    """An optional package is needed for the requested feature."""

    def __init__(self, package: str, feature: str, extra: str):
        super().__init__(f"{feature} needs the '{package}' package: pip install 'raypipe[{extra}]'")


def user_error(e: BaseException) -> BaseException | None:
    """The RaypipeError or OSError (a read-only tree, a full disk) behind `e`, if any: what
    the CLI prints in one line. Anything else behind an exception is a bug."""
    seen, fallback = set(), None
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        remote = getattr(e, "cause", None)  # Ray's wrapper of an error raised in a worker
        if isinstance(remote, BaseException):
            e = remote
            continue
        if isinstance(e, RaypipeError) or (isinstance(e, OSError) and e.errno):
            return e
        if isinstance(e, OSError) and not type(e).__module__.startswith("ray"):
            fallback = fallback or e  # re-raised by Ray with a message of its own, errno lost
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return fallback

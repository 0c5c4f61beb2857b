"""Untrusted text: checked before it reaches the model or a file, escaped before a terminal."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any

from raypipe.errors import InputError

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
# What a terminal acts on rather than shows: C0, DEL and C1 controls (escape sequences, bells,
# NEL), line and paragraph separators, bidi overrides and isolates (they reorder what follows,
# so `abc\u202edcba` reads differently from what it is), and lone surrogates (no UTF-8 form).
_UNPRINTABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def check_text(value: str, where: str | Path, field: str, controls: bool = True) -> str:
    """`value` if it can be written as UTF-8 (and, with `controls=False`, has no control
    characters); else an InputError naming the field and the character's index."""
    # json.loads accepts "\ud800" alone, but UTF-8 cannot encode it: the tokenizer, the JSON
    # and Parquet writers would each fail later, inside the job.
    if m := _SURROGATE.search(value):
        raise InputError(
            where,
            field,
            f"has a lone surrogate \\u{ord(m.group()):04x} at index {m.start()} "
            "(not valid Unicode text, cannot be written as UTF-8)",
        )
    if not controls and (m := _CONTROL.search(value)):
        raise InputError(
            where, field, f"has a control character {m.group()!r} at index {m.start()}"
        )
    return value


def json_kind(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages about the wrong shape."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), "a value")


def shown_json(value: Any) -> str:
    """A parsed JSON value as an error quotes it: its kind for arrays and objects, else the
    value itself, cut to 40 characters."""
    text = json_kind(value) if isinstance(value, list | dict) else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def is_loopback(host: str) -> bool:
    """Whether a host name or address is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def brief(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters: a bad value quoted in an error, not a megabyte."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _escape(m: re.Match) -> str:
    return repr(m.group())[1:-1]  # \n, \x1b, \u202e: each of these is unprintable to repr


def printable(text: object) -> str:
    """`str(text)` safe to print on a terminal: each character it would act on rather than
    show becomes its visible Python escape (`\\n`, `\\x1b`, `\\u202e`); the rest is kept."""
    return _UNPRINTABLE.sub(_escape, str(text))

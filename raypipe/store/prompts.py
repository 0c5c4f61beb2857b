"""Prompt sets (SPEC section 3): `datasets/inference/{set}.json`, validated before anything runs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from raypipe.errors import InputError
from raypipe.store.paths import check_name, check_relpath
from raypipe.store.text import brief, check_text

MAX_PROMPT_CHARS = 200_000


@dataclass(frozen=True)
class PromptItem:
    id: str
    text: str
    system_prompt: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class PromptSet:
    """A validated prompt set. Only its ids are held: the items are read again from the file
    when wanted (`iter_items`), and a run's workers read them themselves (JSON Lines and
    Parquet in parts: see raypipe.pipeline.source), so a large set never sits in the driver.
    A .json set is one JSON document (SPEC 3), read whole wherever it is read."""

    name: str  # the path under datasets/inference, e.g. "starter_prompts/general"
    path: Path
    ids: tuple[str, ...]  # in the file's order
    system_prompt: str | None = None  # a .json set's top-level one (SPEC 3)

    def iter_items(self) -> Iterator[PromptItem]:
        for field, raw in raw_items(self.path):
            yield normalize_item(raw, self.path, field, self.system_prompt)

    @property
    def items(self) -> tuple[PromptItem, ...]:
        """Every item, read now: for small sets (tests, one-off tools)."""
        return tuple(self.iter_items())


def _opt_str(item: dict, key: str, where: Path, field: str) -> str | None:
    value = item.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InputError(where, field, f"must be a string, got {type(value).__name__}")
    return check_text(value, where, field)


FORMATS = (".json", ".jsonl", ".parquet")


def prompt_set_path(datasets_dir: Path, name: str) -> Path:
    """`datasets/inference/{name}` + .json (SPEC 3), .jsonl (one item per line) or .parquet
    (one item per row: id, text or prompt, system_prompt, note); exactly one of them."""
    folder = Path(datasets_dir) / "inference"
    found = [folder / f"{name}{ext}" for ext in FORMATS if (folder / f"{name}{ext}").is_file()]
    if not found:
        raise InputError(folder / f"{name}.json", "prompt_set", f"prompt set '{name}' not found")
    if len(found) > 1:
        raise InputError(
            found[0], "prompt_set", f"is ambiguous: {', '.join(p.name for p in found)} all exist"
        )
    return found[0]


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(path, "prompt_set", f"cannot read: {e.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(path, "prompt_set", f"not valid UTF-8 (byte {e.start})") from None


_SPACE = " \t\n\r"


class _Doc:
    """One JSON document read a value at a time (json's own decoder on each): a set's items
    one by one, so a large .json set is never held as Python objects, only as its text."""

    def __init__(self, path: Path):
        import json

        self.path, self.text = path, _read_text(path)
        self.decoder = json.JSONDecoder()

    def fail(self, e) -> InputError:
        import json

        if isinstance(e, json.JSONDecodeError):
            return InputError(self.path, f"line {e.lineno}", f"malformed JSON: {e.msg}")
        if isinstance(e, RecursionError):
            return InputError(self.path, "file", "malformed JSON: nested too deeply")
        return InputError(self.path, "file", "malformed JSON: a number with too many digits")

    def skip(self, i: int) -> int:
        n = len(self.text)
        while i < n and self.text[i] in _SPACE:
            i += 1
        return i

    def value(self, i: int) -> tuple[object, int]:
        import json

        try:
            return self.decoder.raw_decode(self.text, i)
        except (json.JSONDecodeError, RecursionError, ValueError):
            raise self.malformed() from None

    def expect(self, i: int, char: str) -> int:
        """The position after `char` at (or after white space from) `i`."""
        i = self.skip(i)
        if not self.text.startswith(char, i):
            raise self.malformed()
        return i + 1

    def key(self, i: int) -> tuple[str, int]:
        if not self.text.startswith('"', i):
            raise self.malformed()
        return self.value(i)  # type: ignore[return-value]

    def malformed(self) -> InputError:
        """The document's first error, in json's own words (as reading it whole gives)."""
        import json

        try:
            json.loads(self.text)
        except (json.JSONDecodeError, RecursionError, ValueError) as e:
            return self.fail(e)
        return InputError(self.path, "file", "malformed JSON")

    def array(self, i: int) -> Iterator[object]:
        """The items of the array at `i` ("["); then `self.after` is the position after it."""
        i = self.skip(self.expect(i, "["))
        if not self.text.startswith("]", i):
            while True:
                item, i = self.value(self.skip(i))
                yield item
                i = self.skip(i)
                if self.text.startswith("]", i):
                    break
                i = self.expect(i, ",")
        self.after = i + 1

    def walk(self, i: int) -> tuple[object, int]:
        """The value at `i`, an array item by item (checked, not kept: None), the rest whole."""
        if self.text.startswith("[", i):
            for _ in self.array(i):
                pass
            return None, self.after
        return self.value(i)

    def end(self, i: int) -> None:
        if self.skip(i) < len(self.text):
            raise self.malformed()


def _json_items(path: Path) -> tuple[Iterator[object], str | None]:
    """A .json set's items (read one at a time, from its text) and its system prompt: a bare
    list, or an object with "prompts" (and "system_prompt"). The whole document is checked
    to be one valid JSON value (a pass that keeps no item) before an item is given out."""
    doc = _Doc(path)
    i = doc.skip(0)
    top: dict[str, tuple[int, object]] = {}  # key: (where its value starts, the value)
    if doc.text.startswith("{", i):
        i = doc.skip(i + 1)
        if doc.text.startswith("}", i):
            i += 1
        else:
            while True:
                key, i = doc.key(doc.skip(i))
                i = doc.skip(doc.expect(i, ":"))
                at = i
                value, i = doc.walk(i)  # a list's items are checked, not kept
                top[key] = (at, value)  # a repeated key: the last one counts, as in json.loads
                i = doc.skip(i)
                if doc.text.startswith("}", i):
                    i += 1
                    break
                i = doc.expect(i, ",")
        doc.end(i)
        system_prompt = _opt_str(
            {k: v for k, (_, v) in top.items() if k == "system_prompt"},
            "system_prompt",
            path,
            "system_prompt",
        )
        if "prompts" not in top:
            raise InputError(path, "prompts", "missing (expected a list of prompts)")
        at, value = top["prompts"]
        if not doc.text.startswith("[", at):
            raise InputError(path, "prompts", f"must be a list, got {type(value).__name__}")
    elif doc.text.startswith("[", i):
        at, system_prompt = i, None
        doc.end(doc.walk(i)[1])
    else:
        value, end = doc.value(i)
        doc.end(end)
        raise InputError(path, "prompts", f"must be a list, got {type(value).__name__}")
    return doc.array(at), system_prompt


def parse_line(path: Path, field: str, line: bytes):
    """A line of a JSON Lines set (`field` names it: "line 3"): its item, None if blank."""
    import json

    if not line.strip():
        return None
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(path, field, f"not valid UTF-8 (byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise InputError(path, field, f"malformed JSON: {type(e).__name__}") from None


def _jsonl_items(path: Path) -> Iterator[tuple[str, object]]:
    try:
        f = path.open("rb")
    except OSError as e:
        raise InputError(path, "prompt_set", f"cannot read: {e.strerror}") from None
    with f:
        # Lines end at b"\n" alone (JSON text may hold U+2028 or a lone "\r" unescaped).
        for n, line in enumerate(f, 1):
            item = parse_line(path, f"line {n}", line)
            if item is not None:
                yield f"line {n}", item


PARQUET_BATCH = 4096  # rows read at a time: a large set is never read whole


def _parquet_items(path: Path) -> Iterator[tuple[str, object]]:
    import pyarrow.parquet as pq

    try:
        f = pq.ParquetFile(path)
        batches = f.iter_batches(batch_size=PARQUET_BATCH)
        row = 0
        for batch in batches:
            for item in batch.to_pylist():
                yield f"row {row}", item
                row += 1
    except Exception as e:  # not Parquet, truncated, unreadable
        why = f"not a readable Parquet file ({type(e).__name__})"
        raise InputError(path, "prompt_set", why) from None


def raw_items(path: Path) -> Iterator[tuple[str, object]]:
    """(field label for errors, item as read) of every item of the set's file, in order."""
    if path.suffix == ".json":
        items, _ = _json_items(path)
        for i, item in enumerate(items):
            yield f"prompts[{i}]", item
    elif path.suffix == ".jsonl":
        yield from _jsonl_items(path)
    else:
        yield from _parquet_items(path)


def load_prompt_set(datasets_dir: Path, prompt_set: str) -> PromptSet:
    """Every item checked, in one pass that holds only the ids (SPEC 3)."""
    name = check_relpath(prompt_set, "--prompt-set", "prompt_set")
    path = prompt_set_path(datasets_dir, name)
    if path.suffix == ".json":
        items, system_prompt = _json_items(path)
        rows = ((f"prompts[{i}]", item) for i, item in enumerate(items))
    else:
        system_prompt, rows = None, raw_items(path)
    ids: list[str] = []
    seen: set[str] = set()
    for field, raw in rows:
        ids.append(_item(raw, path, field, system_prompt, seen).id)
    if not ids:
        raise InputError(path, "prompts", "is empty")
    return PromptSet(name=name, path=path, ids=tuple(ids), system_prompt=system_prompt)


def normalize_item(raw, path: Path, field: str, system_prompt: str | None) -> PromptItem:
    """An item of a set load_prompt_set checked already (ids were unique there)."""
    return _item(raw, path, field, system_prompt, set())


def _item(item, path: Path, field: str, system_prompt: str | None, seen: set) -> PromptItem:
    if not isinstance(item, dict):
        raise InputError(path, field, f"must be an object, got {type(item).__name__}")
    if "id" not in item:
        raise InputError(path, f"{field}.id", "missing")
    raw_id = item["id"]
    if isinstance(raw_id, bool) or not isinstance(raw_id, int | str):
        raise InputError(path, f"{field}.id", f"must be an int or string, got {brief(raw_id)}")
    pid = check_name(str(raw_id), path, f"{field}.id")
    if pid in seen:
        raise InputError(path, f"{field}.id", f"duplicate id {pid!r}")
    seen.add(pid)
    # `text`, else `prompt` (SPEC 3); in a table both columns may be there, one of them null.
    key = "prompt" if item.get("text") is None and item.get("prompt") is not None else "text"
    if key == "text" and "text" not in item:
        raise InputError(path, f"{field}.text", "missing (no 'text' or 'prompt')")
    text = item[key]
    if not isinstance(text, str):
        raise InputError(path, f"{field}.{key}", f"must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InputError(path, f"{field}.{key}", "is empty")
    check_text(text, path, f"{field}.{key}")
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(
            path, f"{field}.{key}", f"is {len(text)} characters (limit {MAX_PROMPT_CHARS})"
        )
    own_system = _opt_str(item, "system_prompt", path, f"{field}.system_prompt")
    # An empty note is no note: the response's prompt_note is null, as trait-interp writes it.
    note = _opt_str(item, "note", path, f"{field}.note") or None
    return PromptItem(
        id=pid,
        text=text,
        system_prompt=own_system if own_system is not None else system_prompt,
        note=note,
    )

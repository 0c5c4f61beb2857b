"""Prompt sets (SPEC section 3): `datasets/inference/{set}.json`, validated before anything runs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raypipe.errors import InputError
from raypipe.store.atomic import read_json
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
    name: str  # the path under datasets/inference, e.g. "starter_prompts/general"
    path: Path
    items: tuple[PromptItem, ...]


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


def _jsonl_items(path: Path) -> list:
    import json

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(path, "prompt_set", f"cannot read: {e.strerror}") from None
    items = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            items.append(json.loads(line.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise InputError(path, f"line {n}", f"not valid UTF-8 (byte {e.start})") from None
        except (ValueError, RecursionError) as e:
            raise InputError(path, f"line {n}", f"malformed JSON: {type(e).__name__}") from None
    return items


def _parquet_items(path: Path) -> list:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # not Parquet, truncated, unreadable
        why = f"not a readable Parquet file ({type(e).__name__})"
        raise InputError(path, "prompt_set", why) from None
    return table.to_pylist()


def load_prompt_set(datasets_dir: Path, prompt_set: str) -> PromptSet:
    name = check_relpath(prompt_set, "--prompt-set", "prompt_set")
    path = prompt_set_path(datasets_dir, name)
    system_prompt = None
    if path.suffix == ".json":
        data = read_json(path, "prompt_set")
        if isinstance(data, dict):
            system_prompt = _opt_str(data, "system_prompt", path, "system_prompt")
            if "prompts" not in data:
                raise InputError(path, "prompts", "missing (expected a list of prompts)")
            items = data["prompts"]
        else:
            items = data
        label = "prompts[{}]"
    elif path.suffix == ".jsonl":
        items, label = _jsonl_items(path), "line {}"
    else:
        items, label = _parquet_items(path), "row {}"
    if not isinstance(items, list):
        raise InputError(path, "prompts", f"must be a list, got {type(items).__name__}")
    if not items:
        raise InputError(path, "prompts", "is empty")
    out: list[PromptItem] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        field = label.format(i + 1 if path.suffix == ".jsonl" else i)
        out.append(_item(item, path, field, system_prompt, seen))
    return PromptSet(name=name, path=path, items=tuple(out))


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

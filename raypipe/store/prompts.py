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


def load_prompt_set(datasets_dir: Path, prompt_set: str) -> PromptSet:
    name = check_relpath(prompt_set, "--prompt-set", "prompt_set")
    path = Path(datasets_dir) / "inference" / f"{name}.json"
    if not path.is_file():
        raise InputError(path, "prompt_set", f"prompt set '{name}' not found")
    data = read_json(path, "prompt_set")
    system_prompt = None
    if isinstance(data, dict):
        system_prompt = _opt_str(data, "system_prompt", path, "system_prompt")
        if "prompts" not in data:
            raise InputError(path, "prompts", "missing (expected a list of prompts)")
        items = data["prompts"]
    else:
        items = data
    if not isinstance(items, list):
        raise InputError(path, "prompts", f"must be a list, got {type(items).__name__}")
    if not items:
        raise InputError(path, "prompts", "is empty")
    out: list[PromptItem] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        field = f"prompts[{i}]"
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
        key = "text" if "text" in item else "prompt"
        if key not in item:
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
        note = _opt_str(item, "note", path, f"{field}.note")
        out.append(
            PromptItem(
                id=pid,
                text=text,
                system_prompt=own_system if own_system is not None else system_prompt,
                note=note,
            )
        )
    return PromptSet(name=name, path=path, items=tuple(out))

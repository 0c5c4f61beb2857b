"""Contrastive trait data: `datasets/traits/{category}/{name}/pairs.json`, trait `category/name`
(as trait-interp lays out `datasets/traits/`; the starter traits are `starter_traits/{name}`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from raypipe.errors import InputError
from raypipe.store.atomic import read_json
from raypipe.store.paths import check_name, check_relpath
from raypipe.store.text import check_text

MIN_PAIRS = 4


@dataclass(frozen=True)
class Pair:
    prompt: str
    positive: str
    negative: str


@dataclass(frozen=True)
class TraitData:
    trait: str
    description: str
    pairs: tuple[Pair, ...]


def list_trait_data(traits_dir: Path, trait_set: str) -> list[str]:
    """The traits `{trait_set}/{name}` of one category folder under `datasets/traits/`."""
    check_name(trait_set, "--trait-set", "trait_set")
    folder = traits_dir / trait_set
    if not folder.is_dir():
        raise InputError(folder, "trait_set", "trait set folder not found")
    return sorted(f"{trait_set}/{n.name}" for n in folder.iterdir() if (n / "pairs.json").is_file())


def load_trait_data(traits_dir: Path, trait: str) -> TraitData:
    """`datasets/traits/{trait}/pairs.json` (`traits_dir` is `datasets/traits`)."""
    check_relpath(trait, "--traits", "traits", parts=2)
    path = traits_dir / trait / "pairs.json"
    data = read_json(path, "pairs")
    if not isinstance(data, dict):
        raise InputError(path, "pairs", "must be a JSON object with a 'pairs' list")
    raw = data.get("pairs")
    if not isinstance(raw, list) or len(raw) < MIN_PAIRS:
        raise InputError(path, "pairs", f"must be a list of at least {MIN_PAIRS} pairs")
    pairs = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InputError(path, f"pairs[{i}]", "must be an object")
        values = []
        for key in ("prompt", "positive", "negative"):
            value = item.get(key)
            if not isinstance(value, str) or not value.strip():
                raise InputError(path, f"pairs[{i}].{key}", "must be a non-empty string")
            values.append(check_text(value, path, f"pairs[{i}].{key}"))
        pairs.append(Pair(*values))
    description = data.get("description", "")
    return TraitData(trait, description if isinstance(description, str) else "", tuple(pairs))

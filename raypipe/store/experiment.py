"""Experiment `config.json` (SPEC section 2): model variants and their defaults."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from raypipe.errors import InputError
from raypipe.store.atomic import read_json
from raypipe.store.paths import ExperimentPaths, check_name
from raypipe.store.text import check_text, printable


@dataclass(frozen=True)
class ModelVariant:
    name: str
    model: str  # a local folder, a cached hub id, or an alias such as smollm2-135m-instruct
    lora: str | None = None


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # what PEFT looks for
# A hub id is `name` or `owner/name`; anything else (or starting with `.`, `/`, `~`) is a path.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?")


def _check_adapter_folder(folder: Path, where: Path, field: str) -> None:
    if not folder.is_dir():
        raise InputError(where, field, f"{str(folder)!r} is not a folder (a PEFT adapter folder)")
    if not (folder / ADAPTER_CONFIG).is_file():
        raise InputError(
            where, field, f"{str(folder)!r} has no {ADAPTER_CONFIG}: not a PEFT adapter folder"
        )
    adapter = read_json(folder / ADAPTER_CONFIG, "adapter_config")
    if not isinstance(adapter, dict) or not isinstance(adapter.get("peft_type"), str):
        raise InputError(folder / ADAPTER_CONFIG, "peft_type", "missing: not a PEFT adapter config")
    if not any((folder / name).is_file() for name in ADAPTER_WEIGHTS):
        raise InputError(
            where, field, f"{str(folder)!r} has no {' or '.join(ADAPTER_WEIGHTS)} (adapter weights)"
        )


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    def cached(name: str) -> bool:
        try:
            return isinstance(try_to_load_from_cache(repo_id, name), str)
        except Exception:  # not a valid repo id after all
            return False

    return cached(ADAPTER_CONFIG) and any(cached(name) for name in ADAPTER_WEIGHTS)


def resolve_lora(lora: str, where: Path, field: str) -> str:
    """The adapter PEFT will load, found now rather than after Ray starts and the model loads:
    a local folder (relative to the current directory, as PEFT reads it; returned absolute so
    that a worker with another working directory opens the same one), or a hub id already in
    the local Hugging Face cache (raypipe never downloads; returned as it is, and each worker
    reads its own cache, as for models)."""
    path = Path(lora).expanduser()
    if path.exists() or lora.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(lora):
        if not path.exists():
            relative = (
                "" if path.is_absolute() else f" relative to the current directory {os.getcwd()}"
            )
            raise InputError(where, field, f"adapter folder {lora!r} not found{relative}")
        _check_adapter_folder(path, where, field)
        return str(path.resolve())
    if not _in_hub_cache(lora):
        raise InputError(
            where,
            field,
            f"{lora!r} is neither a folder (relative to the current directory {os.getcwd()}) "
            "nor a hub id in the local cache with an adapter_config.json and weights "
            "(raypipe never downloads)",
        )
    return lora


@dataclass(frozen=True)
class ExperimentConfig:
    variants: dict[str, ModelVariant]
    extraction_variant: str
    application_variant: str
    use_chat_template: bool | None
    path: Path  # the config.json it was read from

    def variant(self, name: str | None, role: str = "application") -> ModelVariant:
        """The variant a command runs (`--model-variant`, else the default for `role`), with
        its LoRA adapter found: the one variant that will load is checked, not every one."""
        if name is None:
            name = self.application_variant if role == "application" else self.extraction_variant
        if name not in self.variants:
            raise InputError(
                "--model-variant",
                "model_variant",
                f"unknown variant {name!r}; config has {sorted(self.variants)}",
            )
        variant = self.variants[name]
        if variant.lora is None:
            return variant
        lora = resolve_lora(variant.lora, self.path, f"model_variants.{name}.lora")
        return replace(variant, lora=lora)


def load_experiment(paths: ExperimentPaths) -> ExperimentConfig:
    check_name(paths.experiment, "--experiment", "experiment")
    path = paths.config
    if not path.is_file():
        raise InputError(path, "experiment", f"experiment '{paths.experiment}' has no config.json")
    return parse_experiment(path, read_json(path, "config"))


def parse_experiment(path: Path, data: object) -> ExperimentConfig:
    """The config of a parsed `config.json` at `path`, checked as `load_experiment` checks it;
    for a reader (the dashboard) that opens the file its own way."""
    if not isinstance(data, dict):
        raise InputError(path, "config", "must be a JSON object")
    raw_variants = data.get("model_variants")
    if not isinstance(raw_variants, dict) or not raw_variants:
        raise InputError(path, "model_variants", "must be a non-empty object")
    variants: dict[str, ModelVariant] = {}
    for name, spec in raw_variants.items():
        field = f"model_variants.{printable(name)}"  # the name may hold a newline: one line
        check_name(name, path, field)
        if not isinstance(spec, dict):
            raise InputError(path, field, "must be an object with a 'model' field")
        model = spec.get("model")
        if not isinstance(model, str) or not model.strip():
            raise InputError(path, f"{field}.model", "must be a non-empty string")
        # Model and adapter names end up in error lines, output files and paths.
        check_text(model, path, f"{field}.model", controls=False)
        lora = spec.get("lora")
        if lora is not None and (not isinstance(lora, str) or not lora.strip()):
            raise InputError(path, f"{field}.lora", "must be a non-empty string")
        if lora is not None:
            check_text(lora, path, f"{field}.lora", controls=False)
        variants[name] = ModelVariant(name=name, model=model, lora=lora)
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise InputError(path, "defaults", "must be an object")
    first = next(iter(variants))
    chosen = {}
    for role in ("extraction", "application"):
        value = defaults.get(role, first)
        if not isinstance(value, str) or value not in variants:
            raise InputError(path, f"defaults.{role}", f"names unknown variant {value!r}")
        chosen[role] = value
    chat = data.get("use_chat_template")
    if chat is not None and not isinstance(chat, bool):
        raise InputError(path, "use_chat_template", "must be true or false")
    return ExperimentConfig(
        variants=variants,
        extraction_variant=chosen["extraction"],
        application_variant=chosen["application"],
        use_chat_template=chat,
        path=path,
    )

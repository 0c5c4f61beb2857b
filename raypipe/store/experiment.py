"""Experiment `config.json` (SPEC section 2): model variants and their defaults."""

from __future__ import annotations

from dataclasses import dataclass

from raypipe.errors import InputError
from raypipe.store.atomic import read_json
from raypipe.store.paths import ExperimentPaths, check_name
from raypipe.store.text import check_text, printable


@dataclass(frozen=True)
class ModelVariant:
    name: str
    model: str  # a local folder, a cached hub id, or an alias such as smollm2-135m-instruct
    lora: str | None = None


@dataclass(frozen=True)
class ExperimentConfig:
    variants: dict[str, ModelVariant]
    extraction_variant: str
    application_variant: str
    use_chat_template: bool | None

    def variant(self, name: str | None, role: str = "application") -> ModelVariant:
        if name is None:
            name = self.application_variant if role == "application" else self.extraction_variant
        if name not in self.variants:
            raise InputError(
                "--model-variant",
                "model_variant",
                f"unknown variant {name!r}; config has {sorted(self.variants)}",
            )
        return self.variants[name]


def load_experiment(paths: ExperimentPaths) -> ExperimentConfig:
    check_name(paths.experiment, "--experiment", "experiment")
    path = paths.config
    if not path.is_file():
        raise InputError(path, "experiment", f"experiment '{paths.experiment}' has no config.json")
    data = read_json(path, "config")
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
    )

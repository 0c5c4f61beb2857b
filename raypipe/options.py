"""Validated option objects, one per concern, built once by the CLI and passed down whole."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from raypipe.engine.generate import GenerationOptions
from raypipe.engine.hooks import COMPONENTS
from raypipe.engine.models import ModelSpec
from raypipe.errors import OPTIONS, OptionError
from raypipe.store.paths import check_name, check_relpath

BACKENDS = ("local", "auto", "vllm")


def split_traits(text: str | None) -> tuple[str, ...] | None:
    """A comma list of traits, blanks dropped and duplicates collapsed; None: every trait."""
    if text is None:
        return None
    traits = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not traits:
        raise OptionError("traits", "names no trait")
    return traits


@dataclass(frozen=True)
class ModelOptions:
    dtype: str = "auto"
    device: str = "auto"
    load_in_4bit: bool = False
    cache_dir: Path = Path(os.path.expanduser("~/.cache/raypipe"))
    variant: str | None = None  # None: the config's default for the role
    device_map: str | None = None  # None: one device, or split over several visible GPUs

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
    method: str | None = None  # None: probe, then mean_diff
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
        if self.method is not None and self.method not in ("probe", "mean_diff"):
            raise OptionError("method", "must be probe or mean_diff")
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

    def __post_init__(self):
        check_name(self.experiment, OPTIONS, "experiment")
        check_relpath(self.prompt_set, OPTIONS, "prompt_set")


@dataclass(frozen=True)
class RunOptions:
    address: str | None = None  # None: a local Ray on loopback
    generate_replicas: int = 1
    project_replicas: int = 1
    batch_size: int = 64  # rows per Ray Data batch
    threads: int | None = None  # torch threads per worker; None: all cores of the node
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


@dataclass(frozen=True)
class InferOptions:
    output: OutputOptions
    model: ModelOptions = field(default_factory=ModelOptions)
    generation: GenerationOptions = field(default_factory=GenerationOptions)
    projection: ProjectionOptions = field(default_factory=ProjectionOptions)
    run: RunOptions = field(default_factory=RunOptions)

    def __post_init__(self):
        if self.projection.compile_prefill and self.run.tp > 1:
            raise OptionError("compile_prefill", "does not combine with `tp`")

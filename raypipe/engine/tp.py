"""Tensor-parallel prefill: process-group setup, sharded loading, and one rank's projector."""

from __future__ import annotations

import os
import socket
import warnings
from datetime import timedelta
from pathlib import Path

import torch

from raypipe.engine.models import ModelSpec
from raypipe.errors import OptionError


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` now (the caller binds it soon after; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(
    rank: int,
    world: int,
    master_addr: str = "127.0.0.1",
    port: int = 29500,
    backend: str | None = None,
    local_rank: int | None = None,
    timeout_s: float = 1800.0,
    store_path: str | None = None,
) -> str:
    """Join the process group of `world` ranks (gloo on CPU, nccl on CUDA); returns the backend.

    Sets the env that transformers' tensor-parallel loading reads (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT). `local_rank` defaults to this rank's index among the GPUs the
    process sees: 0 under Ray, which shows each GPU actor only its own device.

    `store_path`: ranks on one node meet through this file (a FileStore) instead of a TCP
    store at master_addr:port, whose server listens on every interface ("::") and whose
    client looks the address up in DNS (a PTR query for 127.0.0.1 left the machine).
    """
    import torch.distributed as dist

    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    backend = backend or default_backend()
    if local_rank is None:
        local_rank = rank % torch.cuda.device_count() if backend == "nccl" else 0
    os.environ.update(
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(local_rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    if dist.is_initialized():
        if dist.get_rank() != rank or dist.get_world_size() != world:
            raise RuntimeError(
                f"process group already up as rank {dist.get_rank()}/{dist.get_world_size()}"
            )
        return dist.get_backend()
    device_id = None
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device_id = torch.device("cuda", local_rank)
    meet = dict(init_method=f"tcp://{master_addr}:{port}")
    if store_path is not None:
        meet = dict(store=dist.FileStore(store_path, world))
    dist.init_process_group(
        backend=backend,
        **meet,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
        device_id=device_id,
    )
    return backend


def close_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def check_tp(config, world: int) -> None:
    """Refuse a model that transformers would not shard, or would shard unevenly, `world` ways."""
    from raypipe.engine.models import text_config

    cfg = text_config(config)
    if not getattr(cfg, "base_model_tp_plan", None):
        # Without a plan every rank would load the whole model: no memory saved, silently.
        raise OptionError("tp", f"{cfg.model_type} has no tensor-parallel plan")
    for field in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(cfg, field, None)
        if heads is not None and heads % world:
            raise OptionError("tp", f"{field}={heads} does not divide by {world}")


def check_tp_load(load_in_4bit: bool, lora: str | None) -> None:
    """What a sharded load cannot do: checked before Ray starts, and again by load_tp_model."""
    if load_in_4bit:
        raise OptionError("tp", "tensor parallelism does not combine with `load_in_4bit`")
    if lora:
        raise OptionError("tp", "tensor parallelism does not support LoRA variants yet")


def load_tp_model(spec: ModelSpec):
    """(model, tokenizer) sharded over the initialized process group by the model's TP plan.

    Every rank calls this at the same time: loading runs collectives. transformers puts the
    shards on the accelerator it finds (CUDA, else CPU), so `spec.device` must agree with it.
    A world of 1 loads the whole model as `load_model` does.
    """
    import torch.distributed as dist

    from raypipe.engine.models import load_config, load_model, pick_device

    if not dist.is_initialized():
        raise RuntimeError("load_tp_model: call init_distributed on every rank first")
    world = dist.get_world_size()
    if world == 1:
        return load_model(spec)
    check_tp_load(spec.load_in_4bit, spec.lora)
    wanted = pick_device(spec.device).split(":")[0]
    found = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted != found:
        raise OptionError("device", f"`tp` shards onto {found} here, not {wanted}")
    check_tp(load_config(spec.model, spec.cache_dir), world)
    with warnings.catch_warnings():
        # `tp_plan=` is deprecated for DistributedConfig in 5.19, but it is what load_model
        # recognises (no device_map) and stays supported below 5.20, which pyproject pins.
        warnings.filterwarnings(
            "ignore", message="Passing `tp_plan` directly", category=FutureWarning
        )
        model, tok = load_model(spec, tp_plan="auto", tp_size=world)
    if model.tp_size != world:
        raise RuntimeError(f"{type(model).__name__} was not sharded (tp_size={model.tp_size})")
    return model, tok


class TPProjector:
    """One rank of a tensor-parallel projector; every rank gets the same calls, rank 0 the scores.

    The hooks see replicated tensors: a block's output comes after its down_proj all-reduce,
    and transformers' rowwise o_proj reduces inside its replaced `forward`, before forward
    hooks run, so `attn_contribution` is the full sum too (tests/test_tp.py checks both).
    An early stop raises at the same hook on every rank, after that point's all-reduce, so
    no collective is left half-entered.
    """

    def __init__(
        self,
        rank: int,
        world: int,
        master_addr: str,
        port: int,
        spec: ModelSpec,
        vectors: list[tuple[int, list[float]]],  # (layer, vector (D,)) per row
        component: str,
        massive_dims: tuple[int, ...] | None = None,
        max_batch_tokens: int = 16384,
        early_stop: bool = True,
        threads: int | None = None,
        calibration_budget: int | None = None,
        backend: str | None = None,
        store_path: str | None = None,  # ranks on one node: where they meet (init_distributed)
    ):
        from raypipe.engine.projector import Projector

        # Ranks share a node: split its cores rather than oversubscribe them.
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world))
        self.rank, self.world, self.store_path = rank, world, store_path
        self.backend = init_distributed(
            rank, world, master_addr, port, backend, store_path=store_path
        )
        self.model, tok = load_tp_model(spec)
        self.early_stop = early_stop
        self.projector = Projector(
            self.model,
            vectors,
            component=component,
            massive_dims=list(massive_dims) if massive_dims else None,
            early_stop=early_stop,
            max_batch_tokens=max_batch_tokens,
            pad_id=tok.pad_token_id or 0,
        )
        self.collector = None
        if calibration_budget is not None and rank == 0:
            from raypipe.engine.calibration import CalibrationCollector

            # Replicated residuals: rank 0 alone can collect; the others only run the
            # whole stack with it (see `collecting` in project).
            self.collector = CalibrationCollector(self.model, budget=calibration_budget).attach()

    def project(self, seqs: list[list[int]], collecting: bool = False):
        """Rank 0: (list of SequenceScores, calibration result or None, calibration done).
        Other ranks: None. `collecting` must be the same on every rank: it turns off the
        early stop, which would otherwise cut the stack short on some ranks only."""
        self.projector.early_stop = self.early_stop and not collecting
        results = self.projector.project(seqs)
        if self.rank != 0:
            return None
        calib, done = None, True
        if self.collector is not None:
            calib, done = self.collector.result(), self.collector.done
            if done:
                self.collector.detach()
                self.collector = None
        return results, calib, done

    def close(self) -> None:
        if self.collector is not None:
            self.collector.detach()
            self.collector = None
        close_distributed()
        if self.store_path is not None and self.rank == 0:
            # The store's file outlives the group (a gang's next start takes a new one).
            Path(self.store_path).unlink(missing_ok=True)

"""Torch threads of a stage's model on the CPU: one for a model too small to split, the node's
cores for one worth splitting, --threads as given (models.cpu_threads, stages.load_for_stage)."""

from __future__ import annotations

import os

import pytest
import torch

from raypipe.engine.models import SPLIT_MIN_WEIGHTS, ModelSpec, cpu_threads, use_threads
from raypipe.pipeline.stages import load_for_stage
from tests.tiny import save_tiny_model, tiny_llama


def _weights(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_rule():
    assert cpu_threads(SPLIT_MIN_WEIGHTS - 1, 16) == 1
    assert cpu_threads(SPLIT_MIN_WEIGHTS, 16) == 16
    assert cpu_threads(10, 16, requested=3) == 3  # --threads wins, either way
    assert cpu_threads(10**9, 16, requested=1) == 1
    assert cpu_threads(10**9, 0) == 1  # a node that does not say its cores


def test_sizes_straddle_the_threshold():
    """The test model (what bench/scale.py runs) is below it; a model of real layers above."""
    assert _weights(tiny_llama()) < SPLIT_MIN_WEIGHTS
    assert _weights(tiny_llama(layers=2, hidden=512)) >= SPLIT_MIN_WEIGHTS


def test_use_threads_sets_this_process():
    torch.set_num_threads(2)
    assert use_threads(tiny_llama()) == 1
    assert torch.get_num_threads() == 1
    assert use_threads(tiny_llama(), requested=2) == 2
    assert torch.get_num_threads() == 2


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: every rule gives one thread")
def test_stage_load(tmp_path, tiny_model_dir):
    """What every stage's actor (and the model server) loads through."""
    tiny = ModelSpec(str(tiny_model_dir), tmp_path / "cache", dtype="float32", device="cpu")
    load_for_stage(tiny)
    assert torch.get_num_threads() == 1
    load_for_stage(tiny, threads=2)
    assert torch.get_num_threads() == 2
    big_dir = save_tiny_model(tmp_path / "big", layers=2, hidden=512)
    big = ModelSpec(str(big_dir), tmp_path / "cache", dtype="float32", device="cpu")
    load_for_stage(big)
    assert torch.get_num_threads() == os.cpu_count()

"""Shared fixtures: one Ray session for the whole run, and a tiny-model experiment tree."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.tiny import save_tiny_model, write_prompt_set, write_vectors

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

TRAITS = ["behavior/alpha", "tone/beta"]
PROMPTS = [
    "what is the capital of France ?",
    "tell me about water",
    "how do you make a small house ?",
    "write a long sentence about the old man and the sea of people who live here",
    "go",
    "why is the air so hot this day ?",
    "name three good things",
    "help me think",
    "is it true that you can play ?",
    "say one thing",
]


@pytest.fixture(autouse=True)
def _torch_threads():
    """A stage built in this process sets its torch threads (one for the tiny model): the
    next test starts from the process's own count again."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


def infer(root, *extra, quiet: bool = True) -> int:
    """`raypipe infer` on the tiny experiment (fp32, 6 new tokens, batches of 4) via the CLI."""
    from raypipe.cli import main

    args = ["infer", "--root", str(root), "--experiment", "tiny", "--prompt-set", "tests/small"]
    args += ["--dtype", "float32", "--max-new-tokens", "6", "--batch-size", "4"]
    return main([*args, *(["--quiet"] if quiet else []), *extra])


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture
def tiny_root(tmp_path, tiny_model_dir) -> Path:
    """A fresh root with experiments/tiny (variant 'base'), vectors and a prompt set."""
    exp = tmp_path / "experiments" / "tiny"
    exp.mkdir(parents=True)
    (exp / "config.json").write_text(
        json.dumps(
            {
                "defaults": {"extraction": "base", "application": "base"},
                "model_variants": {"base": {"model": str(tiny_model_dir)}},
            }
        )
    )
    write_vectors(exp, TRAITS, n_layers=4, hidden=64)
    write_prompt_set(tmp_path, "tests/small", PROMPTS)
    return tmp_path


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for every test that needs it (ray.init costs ~4 s and 1.6 GiB)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        from raypipe.pipeline.localray import init_local

        init_local(num_cpus=2, logging_level="WARNING")  # loopback only, as a local run
    yield ray
    ray.shutdown()


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst

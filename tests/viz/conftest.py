"""Shared fixtures for the dashboard tests: experiment trees and live servers on them.

`tree` is a small synthetic tree (fast, exact numbers) for the API tests; `real_tree` holds
outputs of the real pipeline on the embedded model, for the browser tests. Set
$RAYPIPE_VIZ_TREE to a folder to keep the real tree there and reuse it on later runs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from raypipe.viz.server import make_server
from tests.viz.fixture_tree import write_fixture_tree
from tests.viz.real_tree import EXPERIMENT, build_real_tree, describe_real_tree


@contextmanager
def _serve(root: Path) -> Iterator[str]:
    """Base URL of a dashboard server on a free loopback port, running in a thread."""
    srv = make_server(root, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv.url.rstrip("/")
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="session")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("viz-root")
    return write_fixture_tree(root)


@pytest.fixture(scope="session")
def server(tree: dict[str, Any]) -> Iterator[str]:
    with _serve(tree["root"]) as url:
        yield url


@pytest.fixture(scope="session")
def real_tree(tmp_path_factory: pytest.TempPathFactory, request) -> dict[str, Any]:
    """extract, calibrate and infer on the embedded model (3.5 min on 2 busy cores)."""
    kept = os.environ.get("RAYPIPE_VIZ_TREE")
    if kept and (Path(kept) / "experiments" / EXPERIMENT / "inference" / "lora").is_dir():
        return describe_real_tree(Path(kept))
    request.getfixturevalue("ray_session")  # only when the pipeline has to run
    root = Path(kept) if kept else tmp_path_factory.mktemp("viz-real")
    root.mkdir(parents=True, exist_ok=True)
    return build_real_tree(root)


@pytest.fixture(scope="session")
def real_server(real_tree: dict[str, Any]) -> Iterator[str]:
    with _serve(real_tree["root"]) as url:
        yield url

"""Shared fixtures for the dashboard tests: a fixture experiment tree and a live server on it."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from raypipe.viz.server import make_server
from tests.viz.fixture_tree import write_fixture_tree


@pytest.fixture(scope="session")
def tree(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("viz-root")
    return write_fixture_tree(root)


@pytest.fixture(scope="session")
def server(tree: dict[str, Any]) -> Iterator[str]:
    """Base URL of a dashboard server on a free loopback port, running in a thread."""
    srv = make_server(tree["root"], "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv.url.rstrip("/")
    finally:
        srv.shutdown()
        srv.server_close()

"""Local web dashboard over an experiments/ tree: trait dynamics, model diffs, overview."""

from raypipe.viz.server import main, make_server, serve

__all__ = ["main", "make_server", "serve"]

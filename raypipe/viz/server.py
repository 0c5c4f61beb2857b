"""`raypipe viz`: a read-only local web server for the dashboard API and its static front-end."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from raypipe.store.paths import experiments_dir
from raypipe.store.text import is_loopback
from raypipe.viz.api import ROUTES, Query
from raypipe.viz.data import ApiError, Tree

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_PORT = 8765
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
}
# Raw experiment files may have been planted by anyone who could write to the tree, so only
# types a browser shows as inert data are served as themselves; everything else (HTML, SVG,
# XML, JS, CSS, PDF, unknown names...) is an opaque download. `inline` ones open in the tab.
_RAW_TYPES = {
    ".json": ("application/json", True),
    ".jsonl": ("text/plain; charset=utf-8", True),
    ".txt": ("text/plain; charset=utf-8", True),
    ".log": ("text/plain; charset=utf-8", True),
    ".md": ("text/plain; charset=utf-8", True),
    ".csv": ("text/plain; charset=utf-8", True),
    ".yaml": ("text/plain; charset=utf-8", True),
    ".yml": ("text/plain; charset=utf-8", True),
    ".png": ("image/png", True),
    ".jpg": ("image/jpeg", True),
    ".jpeg": ("image/jpeg", True),
    ".gif": ("image/gif", True),
    ".webp": ("image/webp", True),
    ".parquet": ("application/vnd.apache.parquet", False),
}
_OPAQUE = ("application/octet-stream", False)
# The page only ever talks to this server: a CSP that forbids other origins keeps it offline
# by construction and blunts script injection through token text.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
# Even an inert type may be sniffed or misread by some browser: a bare sandbox turns off
# scripts, plugins and forms and gives the document an opaque origin, so nothing it runs
# could read the API.
_RAW_CSP = "sandbox; default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"
_LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}


class DashboardServer(ThreadingHTTPServer):
    """The HTTP server over `root/experiments`; each request reads the tree afresh."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], root: Path, quiet: bool = False) -> None:
        self.root = root
        self.tree = Tree(root)
        self.quiet = quiet
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # A browser page on another site can reach a loopback server through DNS rebinding;
        # checking the Host header stops that while the server is only meant for this machine.
        self.check_host = is_loopback(host)
        super().__init__(address, Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else host
        return f"http://{shown}:{port}/"


class Handler(BaseHTTPRequestHandler):
    """Routes GET requests to the JSON API, the static front-end or raw experiment files."""

    server: DashboardServer
    server_version = "raypipe-viz"
    sys_version = ""

    def do_GET(self) -> None:
        self._dispatch(head=False)

    def do_HEAD(self) -> None:
        self._dispatch(head=True)

    def _refuse_method(self) -> None:
        self._send_json(405, {"error": "read-only server: only GET and HEAD"}, head=False)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

    def _dispatch(self, head: bool) -> None:
        try:
            if self.server.check_host and not self._host_ok():
                raise ApiError(403, "unexpected Host header; open the dashboard via 127.0.0.1")
            parts = urlsplit(self.path)
            path = parts.path
            if path.startswith("/api/"):
                route = ROUTES.get(path)
                if route is None:
                    raise ApiError(404, f"no API endpoint {path}")
                endpoint, allowed = route
                payload = endpoint(Tree(self.server.root), Query(parts.query, allowed))
                self._send_json(200, payload, head)
            elif path.startswith("/files/"):
                self._send_file(self._experiment_file(path[len("/files/") :]), head, raw=True)
            else:
                self._send_file(self._static_file(path), head, raw=False)
        except ApiError as err:
            self._send_json(err.status, {"error": err.message}, head)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except OSError as err:
            # A name from the request that the filesystem cannot take (too long, a loop...).
            self._send_json(404, {"error": f"not found ({err.strerror or err})"}, head)
        except Exception as err:  # the page must always get a JSON answer, even for a bug
            if not self.server.quiet:
                traceback.print_exc()
            self._send_json(500, {"error": f"internal error: {type(err).__name__}: {err}"}, head)

    def _host_ok(self) -> bool:
        host = self.headers.get("Host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        return name.lower() in _LOOPBACK_NAMES

    def _static_file(self, path: str) -> Path:
        rel = "index.html" if path in ("/", "/index.html") else None
        if rel is None and path.startswith("/static/"):
            rel = path[len("/static/") :]
        if rel is None:
            raise ApiError(404, f"not found: {path}")
        return _safe_join(STATIC_DIR, rel)

    def _experiment_file(self, rel: str) -> Path:
        tree = self.server.tree
        return tree.inside(_safe_join(tree.base, rel))

    def _send_file(self, path: Path, head: bool, raw: bool) -> None:
        if raw:
            ctype, inline = _RAW_TYPES.get(path.suffix.lower(), _OPAQUE)
        else:
            ctype, inline = _TYPES.get(path.suffix.lower(), "application/octet-stream"), True
        try:
            size = path.stat().st_size
            fh = path.open("rb")
        except OSError:
            raise ApiError(404, "not found") from None
        with fh:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(size))
            self._common_headers(cache=not raw, csp=_RAW_CSP if raw else _CSP)
            if raw:
                self.send_header("Content-Disposition", _disposition(path.name, inline))
            self.end_headers()
            if not head:
                while chunk := fh.read(1 << 16):
                    self.wfile.write(chunk)

    def _send_json(self, status: int, payload: Any, head: bool) -> None:
        body = json.dumps(payload, allow_nan=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self._common_headers(cache=False)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _common_headers(self, cache: bool, csp: str = _CSP) -> None:
        self.send_header("Cache-Control", "no-cache" if cache else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", csp)
        self.send_header("Referrer-Policy", "no-referrer")

    def log_message(self, format: str, *args: Any) -> None:
        if not self.server.quiet:
            super().log_message(format, *args)


def _disposition(name: str, inline: bool) -> str:
    """`Content-Disposition` with the file's name, safe for any bytes the name holds."""
    # The quoted ASCII fallback keeps only harmless characters; `filename*` carries the rest
    # percent-encoded, so no quote, semicolon or line break in a name reaches the header.
    fallback = "".join(c if c.isascii() and (c.isalnum() or c in " .-_") else "_" for c in name)
    kind = "inline" if inline else "attachment"
    return f"{kind}; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


def _safe_join(base: Path, rel: str) -> Path:
    """`base/rel` for a URL path, or 404 if any part would step out of `base`."""
    rel = unquote(rel)
    parts = rel.replace("\\", "/").split("/")
    if not rel or "\x00" in rel or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise ApiError(404, "not found")
    base = base.resolve()
    try:
        path = base.joinpath(*parts).resolve()
    except RuntimeError:  # a symlink loop
        raise ApiError(404, "not found") from None
    if not path.is_relative_to(base) or not path.is_file():
        raise ApiError(404, "not found")
    return path


def make_server(
    root: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT, quiet: bool = False
) -> DashboardServer:
    """A bound, not yet running server over `root/experiments`; port 0 picks a free port."""
    root = Path(root).resolve()
    if not experiments_dir(root).is_dir():
        raise FileNotFoundError(f"no experiments/ folder under {root}")
    return DashboardServer((host, port), root, quiet=quiet)


def serve(root: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> None:
    """Serve the dashboard until interrupted."""
    server = make_server(root, host, port)
    print(f"raypipe viz: {server.tree.base} at {server.url}", file=sys.stderr)
    if not server.check_host:
        print(
            f"raypipe viz: warning: listening on {host}; anyone who can reach it can read "
            "these experiments",
            file=sys.stderr,
        )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    """Command line of `raypipe viz` / `python -m raypipe.viz`."""
    parser = argparse.ArgumentParser(
        prog="raypipe viz", description="Serve a read-only dashboard over an experiments/ tree."
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(os.environ.get("RAYPIPE_ROOT") or "."),
        help="folder holding experiments/ (default: $RAYPIPE_ROOT or the current directory)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default 8765)")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    try:
        serve(args.root, args.host, args.port)
    except (FileNotFoundError, OSError) as err:
        print(f"raypipe viz: {err}", file=sys.stderr)
        return 2
    return 0

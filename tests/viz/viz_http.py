"""HTTP helpers for the dashboard tests: JSON GETs and requests with paths sent verbatim."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit


def get_json(url: str) -> tuple[int, Any]:
    """Status and decoded JSON body of a GET, for success and error answers alike."""
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def raw_request(
    base: str, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, str | None, bytes]:
    """A request whose path is sent exactly as written (urllib would normalise `..`)."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type"), resp.read()
    finally:
        conn.close()

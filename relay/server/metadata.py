"""``GET/HEAD /metadata/{name}``: verified TUF metadata, byte-exact, from memory.

Rules:

* Only files of the verified generation are served; anything else is 404
  (``503`` for ``timestamp.json`` before the first verified sync).
* Versioned files never change under their name (consistent snapshots), so they
  are ``immutable``; ``timestamp.json`` has a short ``max-age``.
* Response headers are computed once per distinct content; a request without
  validators or a range needs no RFC 9110 decision at all.
"""

from __future__ import annotations

import hashlib
import re

from aiohttp import web

from relay.metrics import RelayMetrics
from relay.server.http import decide_for, unavailable
from relay.server.state import STATE

_METADATA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,250}\.json$")
_TIMESTAMP_MAX_AGE = "public, max-age=10"
_IMMUTABLE = "public, max-age=31536000, immutable"
_CONDITIONAL = ("Range", "If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since")


def _cache_control(name: str) -> str:
    if name == "timestamp.json":
        return _TIMESTAMP_MAX_AGE
    return _IMMUTABLE if name[0].isdigit() else "no-cache"


class MetadataHeaders:
    """Per-file response headers of metadata, computed once per distinct content."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[bytes, str, dict[str, str]]] = {}

    def get(self, name: str, data: bytes) -> tuple[str, dict[str, str]]:
        """The strong ETag and the headers of ``name`` holding ``data``."""
        hit = self._entries.get(name)
        if hit is not None and hit[0] is data:
            return hit[1], hit[2]
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        headers = {
            "ETag": etag,
            "Content-Type": "application/json",
            "Cache-Control": _cache_control(name),
            "Accept-Ranges": "bytes",
        }
        if len(self._entries) > 4096:
            self._entries.clear()
        self._entries[name] = (data, etag, headers)
        return etag, headers


METADATA_HEADERS = web.AppKey("metadata_headers", MetadataHeaders)


async def metadata(request: web.Request) -> web.StreamResponse:
    """``GET/HEAD /metadata/{name}``."""
    state = request.app[STATE]
    name = request.match_info["name"]
    data = state.mirror.metadata_file(name)
    if data is None:
        if not _METADATA_NAME.match(name):
            raise web.HTTPNotFound(text="not a metadata file name\n")
        if state.mirror.current is None and name == "timestamp.json":
            return unavailable("no_verified_metadata", 5, state.metrics)
        raise web.HTTPNotFound(text=f"{name} is not in the verified metadata\n")
    return metadata_response(request, name, data, state.metrics, state.started)


def metadata_response(
    request: web.Request, name: str, data: bytes, metrics: RelayMetrics, started: float
) -> web.Response:
    """The answer for metadata file ``name`` holding ``data`` (a worker process's too).

    ``started`` is the relay's start time, the files' ``Last-Modified`` for preconditions.
    """
    etag, base_headers = request.app[METADATA_HEADERS].get(name, data)
    if not any(h in request.headers for h in _CONDITIONAL):
        # The common case: no validators, no range. One response, no decision needed.
        if request.method == "GET":
            metrics.bytes_served.inc(("metadata",), len(data))
        return web.Response(body=data, headers=base_headers)
    decision = decide_for(request, length=len(data), etag=etag, last_modified=started)
    headers = dict(base_headers)
    headers.update(decision.headers)
    if decision.bodiless:
        return web.Response(status=decision.status, headers=headers)
    body = data[decision.start : decision.end]
    if request.method == "GET":
        metrics.bytes_served.inc(("metadata",), len(body))
    return web.Response(status=decision.status, body=body, headers=headers)

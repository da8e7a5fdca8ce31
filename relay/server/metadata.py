"""``GET/HEAD /metadata/{name}``: verified TUF metadata, byte-exact, from memory.

Rules:

* Only files of the verified generation are served; anything else is 404
  (``503`` for ``timestamp.json`` before the first verified sync).
* Versioned files never change under their name (consistent snapshots), so they
  are ``immutable``; ``timestamp.json`` has a short ``max-age``.
* Response headers are computed once per distinct content; a request without
  validators or a range needs no RFC 9110 decision at all, and its answer is a
  :class:`relay.server.http.PreparedResponse` (head serialized once, one write).
* The fast path (:func:`install_fast_path`): a ``GET`` or ``HEAD`` of a file of the
  generation served is answered before the application's router and middlewares;
  every other request (an unknown name, another method, ``Expect``) takes the
  application's route, which answers as the fast path would have.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.web_request import BaseRequest

from relay.metrics import RelayMetrics
from relay.server.connections import ServerHandler
from relay.server.http import PreparedResponse, decide_for, header_lines, unavailable
from relay.server.state import STATE

_METADATA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,250}\.json$")
_TIMESTAMP_MAX_AGE = "public, max-age=10"
_IMMUTABLE = "public, max-age=31536000, immutable"
_PREFIX = "/metadata/"
_ENTRIES_KEPT = 4096


def _cache_control(name: str) -> str:
    if name == "timestamp.json":
        return _TIMESTAMP_MAX_AGE
    return _IMMUTABLE if name[0].isdigit() else "no-cache"


@dataclass(frozen=True, slots=True)
class MetadataEntry:
    """What the answers for one metadata file holding one content share.

    Attributes:
        data: the file's bytes.
        etag: its strong ETag (the quoted sha256).
        headers: the headers of every answer but a bodiless one's length.
        fields: ``headers`` and ``Content-Length`` as head lines (a ``200``).
    """

    data: bytes
    etag: str
    headers: dict[str, str]
    fields: bytes


class MetadataHeaders:
    """Per-file response headers of metadata, computed once per distinct content."""

    def __init__(self) -> None:
        self._entries: dict[str, MetadataEntry] = {}

    def entry(self, name: str, data: bytes) -> MetadataEntry:
        """The headers of ``name`` holding ``data``."""
        hit = self._entries.get(name)
        if hit is not None and hit.data is data:
            return hit
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        headers = {
            "ETag": etag,
            "Content-Type": "application/json",
            "Cache-Control": _cache_control(name),
            "Accept-Ranges": "bytes",
        }
        fields = header_lines([*headers.items(), ("Content-Length", str(len(data)))])
        if len(self._entries) >= _ENTRIES_KEPT:
            self._entries.clear()
        entry = self._entries[name] = MetadataEntry(data, etag, headers, fields)
        return entry


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
    entry = request.app[METADATA_HEADERS].entry(name, data)
    return metadata_response(request, entry, state.metrics, state.started)


def _conditional(request: BaseRequest) -> bool:
    h = request.headers
    return (
        "Range" in h
        or "If-None-Match" in h
        or "If-Modified-Since" in h
        or "If-Match" in h
        or "If-Unmodified-Since" in h
    )


def metadata_response(
    request: BaseRequest, entry: MetadataEntry, metrics: RelayMetrics, started: float
) -> web.StreamResponse:
    """The answer for a metadata file (``entry``), from any process.

    ``started`` is the relay's start time, the files' ``Last-Modified`` for preconditions.
    """
    data = entry.data
    if not _conditional(request):
        # The common case: no validators, no range. One response, no decision needed.
        if request.method == "GET":
            metrics.bytes_served.inc(("metadata",), len(data))
        return PreparedResponse(entry.fields, data)
    decision = decide_for(request, length=len(data), etag=entry.etag, last_modified=started)
    headers = dict(entry.headers)
    headers.update(decision.headers)
    if decision.bodiless:
        return web.Response(status=decision.status, headers=headers)
    body = data[decision.start : decision.end]
    if request.method == "GET":
        metrics.bytes_served.inc(("metadata",), len(body))
    return web.Response(status=decision.status, body=body, headers=headers)


def install_fast_path(
    server: web.Server,
    files: Callable[[str], bytes | None],
    entries: MetadataHeaders,
    metrics: RelayMetrics,
    started: float,
) -> None:
    """Answer metadata files of the generation served before ``server``'s application.

    Call it once the runner is set up, before its sites start.

    Args:
        server: the runner's server (its request handler is wrapped).
        files: a name's bytes in the generation served, or ``None``.
        entries: the application's :data:`METADATA_HEADERS`.
        metrics: counts the answers as the ``metadata`` route does.
        started: the relay's start time (``Last-Modified``).
    """
    server.request_handler = _fast(server.request_handler, files, entries, metrics, started)


def _fast(
    app_handler: ServerHandler,
    files: Callable[[str], bytes | None],
    entries: MetadataHeaders,
    metrics: RelayMetrics,
    started: float,
) -> ServerHandler:
    counts = metrics.requests.values

    async def handle(request: BaseRequest) -> web.StreamResponse:
        path = request.path
        if path.startswith(_PREFIX) and request.method in ("GET", "HEAD"):
            name = path[len(_PREFIX) :]
            data = files(name)
            if data is not None and "Expect" not in request.headers:
                resp = metadata_response(request, entries.entry(name, data), metrics, started)
                counts["metadata", str(resp.status)] += 1
                return resp
        return await app_handler(request)

    return handle

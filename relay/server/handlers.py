"""HTTP handlers: metadata, targets, health, readiness and metrics.

Rules:

* A path that is not in the verified metadata is 404; nothing is proxied blindly.
* Domain errors become HTTP statuses here, in one place: ``StoreFullError`` and
  transfer limits give 503 with ``Retry-After``; a client's mistake is a 4xx,
  never a 500.
* Metadata is served from memory, byte-for-byte; versioned files are immutable,
  ``timestamp.json`` has a short ``max-age``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterator

from aiohttp import web

from relay.cache.mirror import StoredBlob
from relay.cache.store import Fill
from relay.core.model import is_sha256
from relay.core.protocol import AGENT_ID_HEADER, MEDIA_TYPES, formats_from_accept, is_agent_id
from relay.core.rfc9110 import Outcome
from relay.errors import StoreError, StoreFullError
from relay.metrics import CONTENT_TYPE_LATEST, RelayMetrics
from relay.server.admin import add_admin_routes
from relay.server.agents import checkin, reports
from relay.server.app import METRICS, STATE, RelayState
from relay.server.bandwidth import Pacer
from relay.server.blobs import (
    IMMUTABLE,
    AbortedTransferError,
    blob_headers,
    bodiless,
    decide_for,
    send_file_range,
    send_from_fill,
)

logger = logging.getLogger(__name__)

_METADATA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,250}\.json$")
_TIMESTAMP_MAX_AGE = "public, max-age=10"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def agent_key(request: web.Request) -> str:
    """The agent a request counts against: its ``Relay-Agent-Id``, else its address."""
    header = request.headers.get(AGENT_ID_HEADER)
    if header is not None and is_agent_id(header):
        return header
    return request.remote or "unknown"


def _state(request: web.Request) -> RelayState:
    return request.app[STATE]


def _unavailable(reason: str, retry_after: float, state: RelayState) -> web.Response:
    state.metrics.rejected.labels(reason).inc()
    return web.json_response(
        {"error": f"unavailable: {reason}"},
        status=503,
        headers={"Retry-After": str(max(1, int(retry_after)))},
    )


# -- metadata ------------------------------------------------------------------


class _MetadataCache:
    """Per-file response headers of metadata, computed once per distinct content."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[bytes, str, dict[str, str]]] = {}

    def get(self, name: str, data: bytes) -> tuple[str, dict[str, str]]:
        hit = self._entries.get(name)
        if hit is not None and hit[0] is data:
            return hit[1], hit[2]
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        headers = {
            "ETag": etag,
            "Content-Type": "application/json",
            "Cache-Control": _TIMESTAMP_MAX_AGE if name == "timestamp.json" else _immutable(name),
            "Accept-Ranges": "bytes",
        }
        if len(self._entries) > 4096:
            self._entries.clear()
        self._entries[name] = (data, etag, headers)
        return etag, headers


_ETAGS = web.AppKey("metadata_etags", _MetadataCache)
_CONDITIONAL = ("Range", "If-None-Match", "If-Modified-Since", "If-Match", "If-Unmodified-Since")


async def metadata(request: web.Request) -> web.StreamResponse:
    """``GET/HEAD /metadata/{name}``: verified metadata, byte-exact, from memory."""
    state = request.app[STATE]
    name = request.match_info["name"]
    data = state.mirror.metadata_file(name)
    if data is None:
        if not _METADATA_NAME.match(name):
            raise web.HTTPNotFound(text="not a metadata file name\n")
        if state.mirror.current is None and name == "timestamp.json":
            return _unavailable("no_verified_metadata", 5, state)
        raise web.HTTPNotFound(text=f"{name} is not in the verified metadata\n")
    etag, base_headers = request.app[_ETAGS].get(name, data)
    req_headers = request.headers
    if not any(h in req_headers for h in _CONDITIONAL):
        # The common case: no validators, no range. One response, no decision needed.
        if request.method == "GET":
            state.metrics.bytes_served.inc(("metadata",), len(data))
        return web.Response(body=data, headers=base_headers)
    outcome, status, start, end, extra = decide_for(
        request, length=len(data), etag=etag, last_modified=state.started
    )
    headers = dict(base_headers)
    headers.update(extra)
    if outcome in {Outcome.NOT_MODIFIED, Outcome.UNSATISFIABLE, Outcome.PRECONDITION_FAILED}:
        return bodiless(status, headers)
    body = data[start:end]
    if request.method == "GET":
        state.metrics.bytes_served.inc(("metadata",), len(body))
    return web.Response(status=status, body=body, headers=headers)


def _immutable(name: str) -> str:
    # Versioned metadata never changes under its name (consistent snapshots).
    return "public, max-age=31536000, immutable" if name[0].isdigit() else "no-cache"


# -- targets -------------------------------------------------------------------


async def target(request: web.Request) -> web.StreamResponse:
    """``GET/HEAD /targets/{dir}/{sha256}.{name}``: a verified blob, fetched on a miss."""
    state = _state(request)
    tail = request.match_info["tail"]
    leaf = tail.rpartition("/")[2]
    if not is_sha256(leaf.partition(".")[0]):
        raise web.HTTPNotFound(text="target paths are <dir>/<sha256>.<name>\n")
    mirror = state.mirror
    tgt = mirror.resolve(tail)
    if tgt is None:
        if mirror.current is None:
            return _unavailable("no_verified_metadata", 5, state)
        raise web.HTTPNotFound(text="not in the verified metadata\n")
    try:
        source = await mirror.open_blob(tgt)
    except StoreFullError:
        return _unavailable("store_full", state.config.store.retry_after, state)
    except StoreError as e:
        logger.error("cannot serve %s: %s", tgt.path, e)  # noqa: TRY400 - no traceback needed
        return _unavailable("store_error", state.config.store.retry_after, state)
    last_modified = (
        mirror.store.mtime(tgt.sha256) if not isinstance(source, Fill) else source.started
    )
    outcome, status, start, end, extra = decide_for(
        request, length=tgt.length, etag=f'"{tgt.sha256}"', last_modified=last_modified
    )
    headers = blob_headers(tgt.sha256, last_modified)
    headers["Content-Type"] = "application/octet-stream"
    headers.update(extra)
    if outcome in {Outcome.NOT_MODIFIED, Outcome.UNSATISFIABLE, Outcome.PRECONDITION_FAILED}:
        return bodiless(status, headers)
    if request.method == "HEAD":
        head = web.StreamResponse(status=status, headers=headers)
        head.content_length = end - start
        await head.prepare(request)
        return head
    agent = agent_key(request)
    refused = state.gate.try_enter(agent)
    if refused is not None:
        return _unavailable(refused, state.config.limits.retry_after, state)
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = end - start
    try:
        with _paced_slot(state, agent) as pace:
            await _send_blob(request, resp, state, tgt.sha256, source, start, end, pace)
    except AbortedTransferError as e:
        logger.warning("aborted %s for %s: %s", tgt.path, agent, e)
        raise web.HTTPBadGateway from None  # the transport is already aborted
    return resp


@contextlib.contextmanager
def _paced_slot(state: RelayState, agent: str) -> Iterator[Pacer | None]:
    """Hold a transfer slot (already taken with ``gate.try_enter``) and the agent's pacer."""
    try:
        if state.limiter.limited:
            with Pacer(state.limiter, agent) as pace:
                yield pace
        else:
            yield None
    finally:
        state.gate.leave(agent)


async def _send_blob(
    request: web.Request,
    resp: web.StreamResponse,
    state: RelayState,
    sha256: str,
    source: StoredBlob | Fill,
    start: int,
    end: int,
    pace: Pacer | None,
) -> None:
    if isinstance(source, Fill):
        source.attach()
        counter = _bytes_counter(state.metrics, "upstream")
        try:
            await resp.prepare(request)
            await send_from_fill(request, resp, source, start, end, pace, counter)
        finally:
            source.detach()
    else:
        counter = _bytes_counter(state.metrics, "cache")
        with state.mirror.store.serving(sha256):
            entry = await state.files.acquire(sha256, source.path)
            try:
                await resp.prepare(request)
                await send_file_range(request, resp, entry, start, end, pace, counter)
            finally:
                state.files.release(entry)
    await resp.write_eof()


# -- deltas --------------------------------------------------------------------


async def delta(request: web.Request) -> web.StreamResponse:
    """``GET/HEAD /deltas/{from}/{to}``: a relay-made patch; 404 means "use the full target"."""
    state = _state(request)
    src, dst = request.match_info["src"], request.match_info["dst"]
    deltas = state.deltas
    if not (is_sha256(src) and is_sha256(dst)) or deltas is None:
        raise web.HTTPNotFound(text="delta paths are /deltas/<from sha256>/<to sha256>\n")
    current = state.mirror.current
    tgt = current.by_sha256.get(dst) if current is not None else None
    if tgt is None:
        raise web.HTTPNotFound(text="the target is not in the verified metadata\n")
    accept = formats_from_accept(request.headers.get("Accept"))
    patch = deltas.lookup(src, dst, accept)
    if patch is None:
        if state.config.delta.enabled:
            deltas.request(src, dst)  # compute it for next time; never wait for it here
        raise web.HTTPNotFound(text="no delta for this pair: fetch the full target\n")
    etag = f'"delta-{src[:16]}-{dst[:16]}-{patch.format}"'
    outcome, status, start, end, extra = decide_for(
        request, length=patch.length, etag=etag, last_modified=state.started
    )
    headers = {
        "Relay-Delta-Format": str(patch.format),
        "Relay-Target-Sha256": tgt.sha256,
        "Relay-Target-Length": str(tgt.length),
        "Content-Type": MEDIA_TYPES[patch.format],
        "ETag": etag,
        "Cache-Control": IMMUTABLE,
        "Vary": "Accept",
        "Accept-Ranges": "bytes",
    }
    headers.update(extra)
    if outcome in {Outcome.NOT_MODIFIED, Outcome.UNSATISFIABLE, Outcome.PRECONDITION_FAILED}:
        return bodiless(status, headers)
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = end - start
    if request.method == "HEAD":
        await resp.prepare(request)
        return resp
    agent = agent_key(request)
    refused = state.gate.try_enter(agent)
    if refused is not None:
        return _unavailable(refused, state.config.limits.retry_after, state)
    with _paced_slot(state, agent) as pace:
        key = f"delta:{src}:{dst}:{patch.format}"
        try:
            entry = await state.files.acquire(key, patch.path)
        except FileNotFoundError:
            raise web.HTTPNotFound(text="delta vanished: fetch the full target\n") from None
        try:
            await resp.prepare(request)
            counter = _bytes_counter(state.metrics, "delta")
            await send_file_range(request, resp, entry, start, end, pace, counter)
        finally:
            state.files.release(entry)
        await resp.write_eof()
    if status == 200:
        state.metrics.delta_bytes_served.labels(str(patch.format)).inc(patch.length)
        state.metrics.delta_full_bytes.labels(str(patch.format)).inc(tgt.length)
    return resp


# -- operations ----------------------------------------------------------------


async def healthz(_request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: verified metadata exists; the body says how current it is."""
    state = _state(request)
    mirror = state.mirror
    current = mirror.current
    upstreams = [h.to_dict() for h in mirror.upstream.health.values()]
    body: dict[str, object] = {
        "ready": current is not None,
        "timestamp_version": current.timestamp_version if current else None,
        "expires_in_seconds": round(mirror.seconds_until_expiry(), 1) if current else None,
        "last_sync_ok": mirror.last_sync_ok,
        "seconds_since_last_sync": (
            round(time.time() - mirror.last_sync_ok, 1) if mirror.last_sync_ok else None
        ),
        "last_sync_error": mirror.last_sync_error or None,
        "sync_failing_since": mirror.last_sync_failed_at,
        "upstreams": upstreams,
        "targets": len(current.targets) if current else 0,
    }
    failing = [u for u in upstreams if not u["ok"]]
    if failing:
        body["degraded"] = "upstream unreachable: " + ", ".join(
            f"{u['url']} ({u['last_error']})" for u in failing
        )
    return web.json_response(body, status=200 if current is not None else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    state = _state(request)
    body = state.metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _bytes_counter(metrics: RelayMetrics, source: str) -> Callable[[int], None]:
    key = (source,)
    values = metrics.bytes_served.values

    def count(n: int) -> None:
        values[key] += n

    return count


def counted(name: str, handler: Handler) -> Handler:
    """Wrap ``handler`` to count its answers by status (cheaper than a middleware)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        counts = request.app[_COUNTS]
        try:
            resp = await handler(request)
        except web.HTTPException as e:
            counts[name, str(e.status)] += 1
            raise
        counts[name, str(resp.status)] += 1
        return resp

    return wrapped


async def not_found(_request: web.Request) -> web.StreamResponse:
    """Anything else."""
    raise web.HTTPNotFound(text="not found\n")


_COUNTS = web.AppKey("request_counts", dict[tuple[str, ...], float])


def add_routes(app: web.Application) -> None:
    """Register every route of the relay."""
    app[_ETAGS] = _MetadataCache()
    app[_COUNTS] = app[METRICS].requests.values
    for path, handler, name in (
        ("/metadata/{name}", metadata, "metadata"),
        ("/targets/{tail:.+}", target, "targets"),
        ("/deltas/{src}/{dst}", delta, "deltas"),
        ("/healthz", healthz, "healthz"),
        ("/readyz", readyz, "readyz"),
        ("/metrics", metrics_handler, "metrics"),
    ):
        app.router.add_get(path, counted(name, handler), name=name)
    app.router.add_post("/v1/checkin", counted("checkin", checkin), name="checkin")
    app.router.add_post("/v1/reports", counted("reports", reports), name="reports")
    add_admin_routes(app)
    app.router.add_get("/{tail:.*}", counted("other", not_found), name="other")

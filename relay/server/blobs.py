"""Serving blobs and patches: one request path each, top-down.

``GET /targets/{dir}/{sha256}.{name}`` reads in order:

1. **resolve**: the path must name a target of the verified metadata (else 404;
   503 before the first verified sync); nothing is proxied blindly.
2. **open**: the stored blob, or the running single-flight fill (a miss starts
   one); a full store is 503 with ``Retry-After`` and hits keep being served.
3. **decide**: one synchronous RFC 9110 decision gives the status, the byte
   range and the headers (:mod:`relay.core.rfc9110`).
4. **gate**: a transfer slot in total and per agent, else 503 ``Retry-After``.
5. **send**: ``sendfile`` from the open-file cache (stored, unthrottled; ``os.sendfile``
   on the socket where the loop lacks ``loop.sendfile``, as uvloop does), paced
   chunks (throttled), or the growing fill's bytes as they arrive (followers).

``GET /deltas/{from}/{to}`` is the same path over the relay-made patches; a 404
means "fetch the full target". It never starts work: patches are computed after
a sync, and for the pairs check-ins offer (any client may ask for any pair here).

Rules:

* A follower of a fill that fails has its connection aborted: the client sees a
  short read, never a complete-looking corrupt body. The last byte of a body
  from a fill is held back until the fill is verified and committed.
* ``Content-Length`` is always set (no chunked encoding for files).
* Every chunk of a throttled response is paced by the limiter before it is
  read, so no client waits long between bytes.
* The body bytes actually sent (by ``sendfile`` or by writes) are kept on the
  response under :data:`BODY_BYTES` for the access log: aiohttp's own count misses
  what ``sendfile`` sends and includes the header bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Protocol

from aiohttp import web

from relay.cache.mirror import StoredBlob
from relay.cache.store import Fill, FillRestartedError, FillState
from relay.core.model import Target, is_sha256
from relay.core.protocol import MEDIA_TYPES, formats_from_accept
from relay.core.rfc9110 import Decision, format_http_date
from relay.deltas.service import PatchFile
from relay.errors import StoreError, StoreFullError, TargetBackoffError
from relay.server.http import agent_key, decide_for, unavailable, via_worker
from relay.server.state import STATE, Serving
from relay.transfer.bandwidth import Pacer
from relay.transfer.openfiles import OpenFile

logger = logging.getLogger(__name__)

CHUNK = 64 * 1024
IMMUTABLE = "public, max-age=31536000, immutable"
BODY_BYTES = web.ResponseKey("body_bytes", int)
"""Body bytes sent for a blob or patch response (the access log reads it)."""
# Content-addressed URLs never change: any HTTP cache or CDN in front may keep them.
_CONTENT_ADDRESSED = {"Cache-Control": IMMUTABLE, "Accept-Ranges": "bytes"}


FOLLOWER_STALL = 300.0
"""Seconds a follower waits for a fill's next bytes before it gives up (a bound, never
reached while the upstream read deadlines hold)."""


class AbortedTransferError(Exception):
    """The source failed mid-body: the connection was aborted on purpose.

    The client sees a short read (never a complete-looking wrong body), and no
    later response can land inside the declared body of this one.
    """


class ShortFileError(AbortedTransferError):
    """A stored file holds fewer bytes than its signed length."""


# -- GET /targets/{dir}/{sha256}.{name} -------------------------------------------


async def target(request: web.Request) -> web.StreamResponse:
    """``GET/HEAD /targets/{dir}/{sha256}.{name}``: a verified blob, fetched on a miss."""
    state = request.app[STATE]
    mirror = state.mirror
    # 1. resolve
    tail = request.match_info["tail"]
    if not is_sha256(tail.rpartition("/")[2].partition(".")[0]):
        raise web.HTTPNotFound(text="target paths are <dir>/<sha256>.<name>\n")
    tgt = mirror.resolve(tail)
    if tgt is None:
        if mirror.current is None:
            return unavailable("no_verified_metadata", 5, state.metrics)
        raise web.HTTPNotFound(text="not in the verified metadata\n")
    # 2. open
    try:
        source = await mirror.open_blob(tgt)
    except StoreFullError:
        return unavailable("store_full", state.config.store.retry_after, state.metrics)
    except TargetBackoffError as e:
        logger.info("refused %s: %s", tgt.path, e)
        return unavailable("upstream_mismatch", e.retry_after, state.metrics)
    except StoreError as e:
        logger.error("cannot serve %s: %s", tgt.path, e)  # noqa: TRY400 - no traceback needed
        return unavailable("store_error", state.config.store.retry_after, state.metrics)
    last_modified = source.started if isinstance(source, Fill) else mirror.store.mtime(tgt.sha256)
    return await send_blob(request, state, mirror.store, tgt, source, last_modified)


class BlobHolder(Protocol):
    """Where a stored blob lives: pinned while it is read, set aside when it is damaged."""

    def serving(self, sha256: str) -> contextlib.AbstractContextManager[None]:
        """Pin ``sha256`` while a response reads it."""
        ...

    async def quarantine(self, sha256: str, why: str) -> None:
        """Set a damaged blob aside: the next request does not get it."""
        ...


async def send_blob(
    request: web.Request,
    state: Serving,
    holder: BlobHolder,
    tgt: Target,
    source: StoredBlob | Fill,
    last_modified: float,
) -> web.StreamResponse:
    """Steps 3 to 5 of a blob request: decide, gate, send ``source`` (stored or filling).

    A worker process calls it for the blobs it finds stored, with its own state.
    """
    # 3. decide
    decision = decide_for(
        request, length=tgt.length, etag=f'"{tgt.sha256}"', last_modified=last_modified
    )
    headers = {
        "ETag": f'"{tgt.sha256}"',
        "Last-Modified": format_http_date(last_modified),
        "Content-Type": "application/octet-stream",
        **_CONTENT_ADDRESSED,
        **dict(decision.headers),
    }

    # 4. gate, 5. send
    async def send(resp: web.StreamResponse, pace: Pacer | None) -> None:
        try:
            if isinstance(source, Fill):
                await _send_fill(request, resp, state, source, decision, pace)
            else:
                with holder.serving(tgt.sha256):
                    file = (tgt.sha256, source.path)
                    await _send_file(request, resp, state, file, decision, pace, "cache")
        except ShortFileError as e:
            # Truncated on disk after it was checked: fetched again on the next request.
            await holder.quarantine(tgt.sha256, str(e))
            logger.warning("aborted %s for %s: %s", tgt.path, agent_key(request), e)
            raise web.HTTPBadGateway from None  # the transport is already aborted
        except AbortedTransferError as e:
            logger.warning("aborted %s for %s: %s", tgt.path, agent_key(request), e)
            raise web.HTTPBadGateway from None  # the transport is already aborted

    return await _gate_and_send(request, state, decision, headers, send)


async def _send_fill(
    request: web.Request,
    resp: web.StreamResponse,
    state: Serving,
    fill: Fill,
    decision: Decision,
    pace: Pacer | None,
) -> None:
    fill.attach()
    try:
        await resp.prepare(request)
        await stream_from_fill(
            request,
            resp,
            fill,
            decision.start,
            decision.end,
            pace,
            _counter(state, "upstream", resp),
        )
    finally:
        fill.detach()
    await resp.write_eof()


async def _send_file(
    request: web.Request,
    resp: web.StreamResponse,
    state: Serving,
    file: tuple[str, Path],
    decision: Decision,
    pace: Pacer | None,
    source: str,
) -> None:
    """Send the decided range of a stored file (``(cache key, path)``), counted by ``source``."""
    entry = await state.files.acquire(*file)
    try:
        await resp.prepare(request)
        await send_file_range(
            request, resp, entry, decision.start, decision.end, pace, _counter(state, source, resp)
        )
    finally:
        state.files.release(entry)
    await resp.write_eof()


# -- GET /deltas/{from}/{to} --------------------------------------------------------


async def delta(request: web.Request) -> web.StreamResponse:
    """``GET/HEAD /deltas/{from}/{to}``: a relay-made patch; 404 means "use the full target"."""
    state = request.app[STATE]
    deltas = state.deltas
    # 1. resolve
    src, dst = request.match_info["src"], request.match_info["dst"]
    if not (is_sha256(src) and is_sha256(dst)):
        raise web.HTTPNotFound(text="delta paths are /deltas/<from sha256>/<to sha256>\n")
    current = state.mirror.current
    tgt = current.by_sha256.get(dst) if current is not None else None
    if tgt is None:
        raise web.HTTPNotFound(text="the target is not in the verified metadata\n")
    # 2. open
    patch = deltas.lookup(src, dst, formats_from_accept(request.headers.get("Accept")))
    if patch is None:
        raise web.HTTPNotFound(text="no delta for this pair: fetch the full target\n")
    return await send_patch(request, state, tgt, src, patch, state.started)


async def send_patch(
    request: web.Request,
    state: Serving,
    tgt: Target,
    src: str,
    patch: PatchFile,
    last_modified: float,
) -> web.StreamResponse:
    """Steps 3 to 5 of a patch request: decide, gate, send ``patch`` (from ``src`` to ``tgt``).

    A worker process calls it for the patches it finds stored, with its own state.
    """
    dst = tgt.sha256
    # 3. decide
    etag = f'"delta-{src[:16]}-{dst[:16]}-{patch.format}"'
    decision = decide_for(request, length=patch.length, etag=etag, last_modified=last_modified)
    headers = {
        "Relay-Delta-Format": str(patch.format),
        "Relay-Target-Sha256": tgt.sha256,
        "Relay-Target-Length": str(tgt.length),
        "Content-Type": MEDIA_TYPES[patch.format],
        "ETag": etag,
        "Vary": "Accept",
        **_CONTENT_ADDRESSED,
        **dict(decision.headers),
    }

    # 4. gate, 5. send
    async def send(resp: web.StreamResponse, pace: Pacer | None) -> None:
        file = (f"delta:{src}:{dst}:{patch.format}", patch.path)
        try:
            await _send_file(request, resp, state, file, decision, pace, "delta")
        except FileNotFoundError:
            raise web.HTTPNotFound(text="delta vanished: fetch the full target\n") from None
        except AbortedTransferError as e:
            logger.warning("aborted delta %s..%s: %s", src[:12], dst[:12], e)
            raise web.HTTPBadGateway from None  # the transport is already aborted
        if decision.status == 200:
            state.metrics.delta_bytes_served.labels(str(patch.format)).inc(patch.length)
            state.metrics.delta_full_bytes.labels(str(patch.format)).inc(tgt.length)

    return await _gate_and_send(request, state, decision, headers, send)


# -- shared steps -------------------------------------------------------------------


async def _gate_and_send(
    request: web.Request,
    state: Serving,
    decision: Decision,
    headers: dict[str, str],
    send: Callable[[web.StreamResponse, Pacer | None], Awaitable[None]],
) -> web.StreamResponse:
    """Answer without a body (304, 412, 416, HEAD), or take a slot and ``send`` the body.

    A request a worker process forwarded takes no slot and is not paced here: the
    worker did both for its client.
    """
    if decision.bodiless or request.method == "HEAD":
        return await _without_body(request, decision, headers)
    resp = _body_response(decision, headers)
    if via_worker(request):
        await send(resp, None)
        return resp
    agent = agent_key(request)
    if (refused := admit(state, agent)) is not None:
        return refused
    started = asyncio.get_running_loop().time()
    with paced_slot(state, agent) as pace:
        try:
            await send(resp, pace)
        except asyncio.CancelledError:
            # The client went away mid-body and the handler is cancelled: aiohttp writes
            # no access line for a cancelled handler, so an aborted download would vanish
            # from the access log. Write it here, with the bytes that went out.
            _log_cancelled(request, resp, started)
            raise
    return resp


def _log_cancelled(request: web.Request, resp: web.StreamResponse, started: float) -> None:
    protocol = request.protocol
    log_access = getattr(protocol, "log_access", None)
    if log_access is not None:
        log_access(request, resp, started)


async def _without_body(
    request: web.Request, decision: Decision, headers: dict[str, str]
) -> web.StreamResponse:
    """304, 412 and 416 as decided; HEAD with the real length (BITS needs it)."""
    if decision.bodiless:
        return web.Response(status=decision.status, headers=headers)
    head = _body_response(decision, headers)
    await head.prepare(request)
    return head


def _body_response(decision: Decision, headers: dict[str, str]) -> web.StreamResponse:
    resp = web.StreamResponse(status=decision.status, headers=headers)
    resp.content_length = decision.end - decision.start  # never chunked
    return resp


def admit(state: Serving, agent: str) -> web.Response | None:
    """Take a transfer slot for ``agent``; return the 503 to answer when there is none."""
    refused = state.gate.try_enter(agent)
    if refused is None:
        return None
    return unavailable(refused, state.config.limits.retry_after, state.metrics)


@contextlib.contextmanager
def paced_slot(state: Serving, agent: str) -> Iterator[Pacer | None]:
    """Hold the slot :func:`admit` took, with the agent's pacer when egress is limited."""
    try:
        if state.limiter.limited:
            with Pacer(state.limiter, agent) as pace:
                yield pace
        else:
            yield None
    finally:
        state.gate.leave(agent)


def _counter(state: Serving, source: str, resp: web.StreamResponse) -> Callable[[int], None]:
    """Count body bytes sent: in ``relay_bytes_served_total{source}`` and on ``resp``."""
    key = (source,)
    values = state.metrics.bytes_served.values
    resp[BODY_BYTES] = 0

    def count(n: int) -> None:
        values[key] += n
        resp[BODY_BYTES] += n

    return count


# -- sending bytes ------------------------------------------------------------------


async def send_file_range(
    request: web.Request,
    resp: web.StreamResponse,
    entry: OpenFile,
    start: int,
    end: int,
    pace: Pacer | None,
    on_bytes: Callable[[int], None],
) -> None:
    """Send ``[start, end)`` of an open stored file after ``resp`` is prepared."""
    if end <= start:
        return
    if pace is None:
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("connection lost")
        try:
            sent = await asyncio.get_running_loop().sendfile(
                transport, entry.file, start, end - start
            )
        except NotImplementedError:  # uvloop: no loop.sendfile
            if transport.get_write_buffer_size():  # the headers must be out first
                await _stream_file(request, resp, entry.file.fileno(), start, end, None, on_bytes)
                return
            sent = await _sendfile_socket(transport, entry.file.fileno(), start, end - start)
        on_bytes(sent)
        if sent < end - start:
            transport.abort()
            raise ShortFileError(f"file ended {end - start - sent} bytes early")
        return
    await _stream_file(request, resp, entry.file.fileno(), start, end, pace, on_bytes)


async def _sendfile_socket(transport: asyncio.Transport, fd: int, offset: int, count: int) -> int:
    """``os.sendfile`` to the transport's socket, where the loop has no ``loop.sendfile``.

    The transport's buffer must be empty and nothing else may write to it meanwhile
    (the handler owns the connection until its body is sent). The socket is used
    through a duplicate descriptor, which the loop lets this function watch, and which
    is closed whatever happens. A reset or a shutdown of the socket (the connection
    guard's cut) ends the wait and fails the next call.

    Returns:
        The bytes sent: fewer than ``count`` if the file ended early.

    Raises:
        OSError: the socket failed (``ConnectionError`` when the client went away).
    """
    loop = asyncio.get_running_loop()
    out = os.dup(transport.get_extra_info("socket").fileno())
    sent = 0
    try:
        while sent < count:
            try:
                n = os.sendfile(out, fd, offset + sent, count - sent)
            except BlockingIOError:
                writable = loop.create_future()
                loop.add_writer(out, _wake, writable)
                try:
                    await writable
                finally:
                    loop.remove_writer(out)
                continue
            if n == 0:
                break
            sent += n
    finally:
        os.close(out)
    return sent


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _stream_file(
    request: web.Request,
    resp: web.StreamResponse,
    fd: int,
    start: int,
    end: int,
    pace: Pacer | None,
    on_bytes: Callable[[int], None],
) -> None:
    loop = asyncio.get_running_loop()
    offset = start
    while offset < end:
        size = min(pace.chunk() if pace is not None else CHUNK, end - offset)
        if pace is not None:
            await pace.wait(size)
        data = await loop.run_in_executor(None, os.pread, fd, size, offset)
        if not data:
            _abort(request)
            raise ShortFileError(f"file ended {end - offset} bytes early")
        await resp.write(data)
        offset += len(data)
        on_bytes(len(data))


async def stream_from_fill(
    request: web.Request,
    resp: web.StreamResponse,
    fill: Fill,
    start: int,
    end: int,
    pace: Pacer | None,
    on_bytes: Callable[[int], None],
) -> None:
    """Stream ``[start, end)`` of a growing fill as its bytes arrive.

    The last byte of the body is held back until the fill is verified and
    committed, so a client never receives a complete-looking body of bytes that
    turn out not to match the signed hash.

    Raises:
        AbortedTransferError: the fill failed; the connection has been aborted.
    """
    offset = start
    attempt = fill.restarts
    while offset < end:
        state = fill.state
        if state is FillState.FAILED:
            _abort(request)
            raise AbortedTransferError(f"fill of {fill.sha256} failed: {fill.error}")
        if fill.restarts != attempt:
            if offset > start:
                # Bytes of the abandoned attempt already went out: the client must see
                # a failed transfer, never old bytes followed by new ones.
                _abort(request)
                raise AbortedTransferError(f"fill of {fill.sha256} restarted from zero")
            attempt = fill.restarts
        limit = end if state is FillState.COMPLETE else min(fill.written, end - 1)
        if offset >= limit:
            try:
                await fill.wait_change(fill.written, FOLLOWER_STALL)
            except TimeoutError:
                _abort(request)
                raise AbortedTransferError(
                    f"fill of {fill.sha256} made no progress for {FOLLOWER_STALL:.0f} s"
                ) from None
            continue
        size = min(pace.chunk() if pace is not None else CHUNK, limit - offset)
        if pace is not None:
            await pace.wait(size)
        try:
            data = await fill.read(offset, size, attempt)
        except FillRestartedError:
            continue  # decided at the top of the loop
        except StoreError as e:
            _abort(request)
            raise AbortedTransferError(str(e)) from e
        if not data:
            continue
        await resp.write(data)
        offset += len(data)
        on_bytes(len(data))


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()

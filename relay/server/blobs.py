"""Sending blobs: RFC 9110 decisions, sendfile fast path, streaming from fills.

Rules:

* One synchronous decision per request (:func:`relay.core.rfc9110.decide`)
  gives the status, the byte range and the headers; the rest is I/O.
* A stored blob sent unthrottled goes out with ``loop.sendfile`` from a small cache
  of open files (like nginx's ``open_file_cache``): a hot blob costs no thread-pool
  hop at all; a cold one costs one (the ``open``).
* A throttled response, or one that follows a fill, is written in small chunks
  read with ``os.pread`` in a thread, each chunk paced by the limiter first, so no
  client waits long between bytes.
* A follower of a fill that fails (wrong hash) has its connection aborted: the
  client sees a short read, never a complete-looking corrupt body.
* ``Content-Length`` is always set (no chunked encoding for files).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import IO

from aiohttp import web

from relay.cache.store import Fill, FillState
from relay.core.rfc9110 import Outcome, decide, format_http_date
from relay.errors import StoreError
from relay.server.bandwidth import Pacer

logger = logging.getLogger(__name__)

CHUNK = 64 * 1024
IMMUTABLE = "public, max-age=31536000, immutable"


class _OpenFile:
    __slots__ = ("evicted", "file", "users")

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.users = 0
        self.evicted = False


class OpenFileCache:
    """Open read-only files of hot blobs, keyed by digest, least recently used out.

    A file is closed only when it has left the cache and no response uses it.
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._files: OrderedDict[str, _OpenFile] = OrderedDict()

    async def acquire(self, sha256: str, path: Path) -> _OpenFile:
        """Return the open file of ``sha256`` (opening it in a thread if needed).

        Raises:
            OSError: the file cannot be opened.
        """
        entry = self._files.get(sha256)
        if entry is None:
            file = await asyncio.get_running_loop().run_in_executor(None, path.open, "rb")
            entry = self._files.get(sha256)  # another request may have opened it meanwhile
            if entry is None:
                entry = _OpenFile(file)
                self._files[sha256] = entry
                self._trim()
            else:
                _close_later(file)
        self._files.move_to_end(sha256)
        entry.users += 1
        return entry

    def release(self, entry: _OpenFile) -> None:
        """Stop using ``entry``."""
        entry.users -= 1
        if entry.evicted and entry.users == 0:
            _close_later(entry.file)

    def forget(self, sha256: str) -> None:
        """Drop ``sha256`` (evicted or quarantined blob)."""
        entry = self._files.pop(sha256, None)
        if entry is not None:
            entry.evicted = True
            if entry.users == 0:
                _close_later(entry.file)

    def _trim(self) -> None:
        while len(self._files) > self._size:
            _, entry = self._files.popitem(last=False)
            entry.evicted = True
            if entry.users == 0:
                _close_later(entry.file)

    def close(self) -> None:
        """Close every file (at shutdown)."""
        for entry in self._files.values():
            with contextlib.suppress(OSError):
                entry.file.close()
        self._files.clear()


def _close_later(file: IO[bytes]) -> None:
    with contextlib.suppress(RuntimeError):
        # Fire and forget: closing a read-only regular file needs no result.
        _ = asyncio.get_running_loop().run_in_executor(None, file.close)


def blob_headers(sha256: str, last_modified: float) -> dict[str, str]:
    """Validators and caching headers of a content-addressed blob."""
    return {
        "ETag": f'"{sha256}"',
        "Last-Modified": format_http_date(last_modified),
        "Cache-Control": IMMUTABLE,
        "Accept-Ranges": "bytes",
    }


def decide_for(
    request: web.Request, *, length: int, etag: str, last_modified: float
) -> tuple[Outcome, int, int, int, tuple[tuple[str, str], ...]]:
    """Run the RFC 9110 decision for ``request``; return (outcome, status, start, end, headers)."""
    h = request.headers
    d = decide(
        method=request.method,
        length=length,
        etag=etag,
        last_modified=last_modified,
        range_header=h.get("Range"),
        if_range=h.get("If-Range"),
        if_none_match=h.get("If-None-Match"),
        if_modified_since=h.get("If-Modified-Since"),
        if_match=h.get("If-Match"),
        if_unmodified_since=h.get("If-Unmodified-Since"),
    )
    return d.outcome, d.status, d.start, d.end, d.headers


def bodiless(status: int, headers: dict[str, str]) -> web.Response:
    """A response without a body (304, 412, 416) with ``headers``."""
    return web.Response(status=status, headers=headers)


class AbortedTransferError(Exception):
    """The source failed mid-body: the connection was aborted on purpose."""


async def send_file_range(
    request: web.Request,
    resp: web.StreamResponse,
    entry: _OpenFile,
    start: int,
    end: int,
    pace: Pacer | None,
    on_bytes: Callable[[int], None],
) -> None:
    """Send ``[start, end)`` of an open stored file after ``resp`` is prepared."""
    if end <= start or request.method == "HEAD":
        return
    if pace is None:
        transport = request.transport
        if transport is None:
            raise ConnectionResetError("connection lost")
        loop = asyncio.get_running_loop()
        try:
            await loop.sendfile(transport, entry.file, start, end - start)
        except NotImplementedError:
            await _stream_file(resp, entry.file.fileno(), start, end, None, on_bytes)
            return
        on_bytes(end - start)
        return
    await _stream_file(resp, entry.file.fileno(), start, end, pace, on_bytes)


async def _stream_file(
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
            raise AbortedTransferError("blob shorter than its signed length")
        await resp.write(data)
        offset += len(data)
        on_bytes(len(data))


async def send_from_fill(
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
    if request.method == "HEAD":
        return
    offset = start
    while offset < end:
        state = fill.state
        if state is FillState.FAILED:
            _abort(request)
            raise AbortedTransferError(f"fill of {fill.sha256} failed: {fill.error}")
        limit = end if state is FillState.COMPLETE else min(fill.written, end - 1)
        if offset >= limit:
            await fill.wait_change(fill.written)
            continue
        size = min(pace.chunk() if pace is not None else CHUNK, limit - offset)
        if pace is not None:
            await pace.wait(size)
        try:
            data = await fill.read(offset, size)
        except StoreError as e:
            _abort(request)
            raise AbortedTransferError(str(e)) from e
        if not data:
            continue  # the fill restarted from zero; wait for its bytes again
        await resp.write(data)
        offset += len(data)
        on_bytes(len(data))


def _abort(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()

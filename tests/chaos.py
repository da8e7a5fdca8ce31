"""A misbehaving origin and a failing disk, for the fault suite and the chaos benchmark.

:class:`ChaosOrigin` serves a publisher's ``public/`` tree on loopback like a static
server, except that each request of a path may be answered by a :class:`Mode` taken
from a per-path plan (or drawn by a chooser): a transfer cut at a random offset, a
wrong prefix then a cut, a resume that ignores ``Range``, a trickle, endless bytes, a
connection reset, or a 5xx storm. :class:`FailingWrites` makes the blob store's writes
fail with ``ENOSPC`` or ``EIO`` while it is on.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import os
import random
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web


class Mode(enum.Enum):
    """How the origin answers one request."""

    OK = "ok"  # the file, Range honoured
    CUT = "cut"  # the file from the asked offset, cut at a random point
    WRONG_PREFIX = "wrong-prefix"  # wrong bytes for a while, then a cut
    IGNORE_RANGE = "ignore-range"  # 200 with the whole (right) file, whatever Range says
    TRICKLE = "trickle"  # a few bytes at a time, slowly
    ENDLESS = "endless"  # 200, no length, bytes without end
    RESET = "reset"  # the connection closed before any answer
    STORM = "storm"  # 500, 502 or 503


@dataclass
class ChaosOrigin:
    """A static origin with faults; ``plans[path]`` is consumed one mode per request."""

    public: Path
    rng: random.Random = field(default_factory=lambda: random.Random(1))
    plans: dict[str, deque[Mode]] = field(default_factory=dict)
    chooser: Callable[[str], Mode] | None = None  # used when a path has no plan left
    hits: Counter[str] = field(default_factory=Counter)
    modes_used: Counter[Mode] = field(default_factory=Counter)
    trickle_delay: float = 0.2

    def plan(self, path: str, *modes: Mode) -> None:
        """Answer the next requests of ``path`` with ``modes``, in order."""
        self.plans[path] = deque(modes)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        return app

    def _mode(self, path: str) -> Mode:
        queue = self.plans.get(path)
        if queue:
            return queue.popleft()
        return self.chooser(path) if self.chooser is not None else Mode.OK

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["tail"]
        self.hits[path] += 1
        mode = self._mode(path)
        self.modes_used[mode] += 1
        if mode is Mode.RESET:
            _abort(request)
            return web.Response(status=500)  # never sent: the connection is gone
        if mode is Mode.STORM:
            return web.Response(status=self.rng.choice((500, 502, 503)))
        if mode is Mode.ENDLESS:
            return await self._endless(request)
        file = (self.public / path).resolve()
        if not file.is_relative_to(self.public.resolve()) or not file.is_file():
            raise web.HTTPNotFound
        data = await asyncio.to_thread(file.read_bytes)
        start = 0
        range_header = request.headers.get("Range", "")
        if mode is not Mode.IGNORE_RANGE and range_header.startswith("bytes="):
            first = range_header[6:].split("-")[0]
            if first.isdigit() and int(first) < len(data):
                start = int(first)
        headers = {"Content-Type": "application/octet-stream"}
        status = 200
        if start:
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(data) - start
        await resp.prepare(request)
        body = data[start:]
        if mode is Mode.WRONG_PREFIX:
            wrong = bytes(b ^ 0x5A for b in body[: max(1, len(body) // 2)])
            for i in range(0, len(wrong), 16 * 1024):
                await resp.write(wrong[i : i + 16 * 1024])
                await asyncio.sleep(0.01)  # slow enough for followers to stream it
            _abort(request)
            return resp
        cut = self.rng.randrange(1, len(body)) if mode is Mode.CUT and len(body) > 1 else None
        step = 64 if mode is Mode.TRICKLE else 16 * 1024
        for i in range(0, len(body), step):
            piece = body[i : i + step]
            if cut is not None and i + len(piece) >= cut:
                await resp.write(piece[: cut - i])
                await asyncio.sleep(0.01)
                _abort(request)
                return resp
            await resp.write(piece)
            if mode is Mode.TRICKLE:
                await asyncio.sleep(self.trickle_delay)
        await resp.write_eof()
        return resp

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        junk = b'{"signed": ' + b" " * 65_000
        with contextlib.suppress(ConnectionError):
            for _ in range(4096):  # 256 MiB at most: "without end" for any sane client
                if request.transport is None or request.transport.is_closing():
                    break
                await resp.write(junk)
        return resp


def _abort(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


class FailingWrites:
    """Makes ``os.pwrite`` (how the blob store writes fills) fail while on.

    Only writes to files under ``root`` fail; everything else in the process is
    untouched.
    """

    def __init__(self, root: Path, error: int = errno.ENOSPC) -> None:
        self.root = root
        self.error = error
        self.on = False
        self.failed = 0
        self._real = os.pwrite
        self._fds_under_root: Callable[[int], bool] = self._is_under_root

    def _is_under_root(self, fd: int) -> bool:
        try:
            return Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(self.root)
        except OSError:
            return False

    def _pwrite(self, fd: int, data: object, offset: int) -> int:
        if self.on and self._fds_under_root(fd):
            self.failed += 1
            raise OSError(self.error, os.strerror(self.error))
        return self._real(fd, data, offset)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def installed(self) -> Iterator[FailingWrites]:
        os.pwrite = self._pwrite  # type: ignore[assignment]
        try:
            yield self
        finally:
            os.pwrite = self._real

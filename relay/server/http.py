"""HTTP helpers every handler shares: who is asking, bounded JSON bodies, refusals.

Rules:

* A client's mistake is a 4xx with a JSON ``{"error": ...}`` naming the field;
  an overload is ``503`` with ``Retry-After``; never a 500.
* A body larger than :data:`MAX_BODY` is refused (``413``) from its
  ``Content-Length`` before it is read, and while it is read.
* A body must arrive within ``limits.body_timeout`` of the end of the request's
  head, else ``408`` and the connection is closed (:func:`body_deadline`): a client
  that announces a body and stops sending holds neither a handler nor a
  connection for longer (the connection guard's eviction spares a connection
  with a request in progress).
* Requests are counted by a handler wrapper (:func:`counted`), cheaper than a
  middleware on the hot paths.
* A ``200`` of bytes held in memory can be a :class:`PreparedResponse`: its head
  is serialized once per content, and goes out with the body in one write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from email.utils import formatdate
from typing import Any, TypeVar

from aiohttp import HttpVersion10, HttpVersion11, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.web_request import BaseRequest

from relay.core.protocol import (
    AGENT_ID_HEADER,
    AGENT_TOKEN_HEADER,
    is_agent_id,
    parse_json_object,
)
from relay.core.rfc9110 import Decision, decide
from relay.core.tokens import verify_token
from relay.errors import BodyError, StateDamagedError, StateUnavailableError
from relay.metrics import RelayMetrics
from relay.server.state import AGENT_SECRET, METRICS, STATE

logger = logging.getLogger(__name__)

MAX_BODY = 256 * 1024
BODY_TIMEOUT = 30.0
"""Seconds a body may take where no relay state says (``limits.body_timeout``)."""
STATE_RETRY_AFTER = 30  # seconds: a full disk is not fixed in a moment
T = TypeVar("T")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
COUNTS = web.AppKey("request_counts", dict[tuple[str, ...], float])
CLIENT_ADDRESS_HEADER = "Relay-Client-Address"
"""The client's address, as a worker process passes it on with a forwarded request."""
VIA_WORKER = web.RequestKey("via_worker", bool)
"""Set on a request a worker process forwarded over the leader's private socket."""


def via_worker(request: web.Request) -> bool:
    """Whether a worker process forwarded ``request`` (it gates and paces the transfer)."""
    return bool(request.get(VIA_WORKER, False))


def header_lines(headers: Iterable[tuple[str, str]]) -> bytes:
    """``Name: value`` lines ending in CRLF, as a response head holds them.

    Raises:
        ValueError: a name or value holds a line break (it would split the head).
    """
    out = []
    for name, value in headers:
        line = f"{name}: {value}\r\n"
        if line.count("\n") != 1 or "\r" in line[:-2]:
            raise ValueError(f"header {name!r}: a line break in a header")
        out.append(line)
    return "".join(out).encode("latin-1")


_STATUS_11 = b"HTTP/1.1 200 OK\r\n"
_STATUS_10 = b"HTTP/1.0 200 OK\r\n"
_SERVER = f"Server: {SERVER_SOFTWARE}\r\n".encode()
_KEEP_ALIVE = b"Connection: keep-alive\r\n\r\n"
_CLOSE = b"Connection: close\r\n\r\n"
_date_line: tuple[int, bytes] = (0, b"")


def date_line() -> bytes:
    """The ``Date`` header line of the current second (formatted once a second)."""
    global _date_line  # noqa: PLW0603 - one value per process, replaced once a second
    now = int(time.time())
    if _date_line[0] != now:
        _date_line = (now, f"Date: {formatdate(now, usegmt=True)}\r\n".encode())
    return _date_line[1]


class PreparedResponse(web.StreamResponse):
    """``200 OK`` with a body held in memory, its head serialized once per content.

    The status line, ``Date``, ``Server`` and ``Connection`` are added per request by
    the rules of aiohttp's ``Response``: ``Connection: close`` when an HTTP/1.1
    connection is not kept alive, ``Connection: keep-alive`` when an HTTP/1.0 one is;
    ``HEAD`` gets the head alone (with the body's ``Content-Length``). Head and body
    go out in one write. No ``on_response_prepare`` signal is sent: for paths whose
    applications have none.

    Args:
        fields: the header lines (:func:`header_lines`), ``Content-Length`` included.
        body: the body.
    """

    def __init__(self, fields: bytes, body: bytes) -> None:
        super().__init__()
        self._fields = fields
        self.payload = body
        self._wire = b""

    @property
    def sent(self) -> int:
        """The body bytes this response sends (none for ``HEAD``); known once prepared."""
        if not self._wire or self._must_be_empty_body:
            return 0
        return len(self.payload)

    async def _start(self, request: BaseRequest) -> AbstractStreamWriter:
        # StreamResponse.prepare decided _must_be_empty_body (HEAD) before this.
        self._req = request
        writer = self._payload_writer = request.writer
        keep_alive = self._keep_alive
        if keep_alive is None:
            keep_alive = self._keep_alive = request.keep_alive
        version = request.version
        if version == HttpVersion11:
            status, end = _STATUS_11, b"\r\n" if keep_alive else _CLOSE
        elif version == HttpVersion10:
            status, end = _STATUS_10, _KEEP_ALIVE if keep_alive else b"\r\n"
        else:  # what aiohttp's parser lets through: HTTP/1.x, answered as 1.x
            status = f"HTTP/{version.major}.{version.minor} 200 OK\r\n".encode()
            end = b"\r\n"
        head = b"".join((status, self._fields, date_line(), _SERVER, end))
        self._wire = head if self._must_be_empty_body else head + self.payload
        return writer

    async def write_eof(self, data: bytes = b"") -> None:
        """Send head and body in one write (``data`` must be empty).

        Raises:
            ValueError: ``data`` is not empty: the body is the one given.
        """
        if data:
            raise ValueError("a PreparedResponse sends the body it was given")
        if self._eof_sent:
            return
        await super().write_eof(self._wire)


def verified_agent(request: web.Request) -> str | None:
    """The ``Relay-Agent-Id`` of ``request`` when its ``Relay-Agent-Token`` proves it."""
    agent_id = request.headers.get(AGENT_ID_HEADER)
    token = request.headers.get(AGENT_TOKEN_HEADER)
    if agent_id is None or token is None or not is_agent_id(agent_id):
        return None
    secret = request.app.get(AGENT_SECRET)
    if not secret or not verify_token(secret, agent_id, token, time.time()):
        return None
    return agent_id


def agent_key(request: web.Request) -> str:
    """What a request counts against: its proven agent id, else its client address.

    ``agent:<id>`` when the ``Relay-Agent-Token`` proves the id, else
    ``addr:<client address>``: an id anyone can type is worth no more than its address.
    """
    agent_id = verified_agent(request)
    if agent_id is not None:
        return f"agent:{agent_id}"
    return f"addr:{request.remote or 'unknown'}"


def bad_request(message: str) -> web.Response:
    """``400`` with a JSON error."""
    return web.json_response({"error": message}, status=400)


def unavailable(
    reason: str, retry_after: float, metrics: RelayMetrics, *, detail: str = ""
) -> web.Response:
    """``503`` with ``Retry-After``, counted by ``reason`` (a fixed word).

    ``detail`` is added to the error for the client: the problem, in words.
    """
    metrics.rejected.labels(reason).inc()
    return web.json_response(
        {"error": f"unavailable: {reason}" + (f": {detail}" if detail else "")},
        status=503,
        headers={"Retry-After": str(max(1, int(retry_after)))},
    )


class BodyTimeoutError(Exception):
    """The body did not arrive in time (:func:`body_deadline`)."""


@contextlib.asynccontextmanager
async def body_deadline(request: web.Request) -> AsyncIterator[None]:
    """Read the body of ``request`` within ``limits.body_timeout`` (read on each request).

    Raises:
        BodyTimeoutError: the deadline passed (counted as
            ``relay_connections_closed_total{reason="body_timeout"}``); answer
            :func:`body_timed_out`.
    """
    state = request.app.get(STATE)
    timeout = state.config.limits.body_timeout if state is not None else BODY_TIMEOUT
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError:
        metrics = request.app.get(METRICS)
        if metrics is not None:
            metrics.connections_closed.labels("body_timeout").inc()
        raise BodyTimeoutError(f"body: not received within {timeout:g} s") from None


def body_timed_out(error: BodyTimeoutError) -> web.Response:
    """The ``408`` for a body late past its deadline; the connection is closed after it."""
    return web.json_response({"error": str(error)}, status=408, headers={"Connection": "close"})


async def _read_at_most(request: web.Request, limit: int) -> bytes | None:
    """The body of ``request``, or ``None`` once it is longer than ``limit``."""
    raw = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        raw += chunk
        if len(raw) > limit:
            return None
    return bytes(raw)


async def read_json_body(request: web.Request) -> dict[str, Any] | web.Response:
    """Read a bounded JSON object body, or return the error response."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        return web.json_response({"error": f"body: larger than {MAX_BODY} bytes"}, status=413)
    ctype = request.content_type
    if ctype not in ("application/json", "application/octet-stream", ""):
        return web.json_response({"error": "body: expected application/json"}, status=415)
    if request.content.is_eof():  # the whole body came with the head: nothing to wait for
        raw = await _read_at_most(request, MAX_BODY)
    else:
        try:
            async with body_deadline(request):
                raw = await _read_at_most(request, MAX_BODY)
        except BodyTimeoutError as e:
            return body_timed_out(e)
    if raw is None:
        return web.json_response({"error": f"body: larger than {MAX_BODY} bytes"}, status=413)
    try:
        return parse_json_object(raw)
    except BodyError as e:
        return bad_request(str(e))


async def parse_body(
    request: web.Request, parse: Callable[[dict[str, Any]], T]
) -> T | web.Response:
    """Read a bounded JSON object body and ``parse`` it, or return the 4xx to answer."""
    body = await read_json_body(request)
    if isinstance(body, web.Response):
        return body
    try:
        return parse(body)
    except BodyError as e:
        return bad_request(str(e))


def decide_for(request: BaseRequest, *, length: int, etag: str, last_modified: float) -> Decision:
    """Run the RFC 9110 decision (preconditions, Range, If-Range) for ``request``."""
    h = request.headers
    return decide(
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


def counted(name: str, handler: Handler) -> Handler:
    """Wrap ``handler`` to count its answers by status."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        counts = request.app[COUNTS]
        try:
            resp = await handler(request)
        except web.HTTPException as e:
            counts[name, str(e.status)] += 1
            raise
        except StateUnavailableError as e:
            # Disk full or an I/O error under the state database: nothing was changed,
            # the client may try again; never a 500.
            if not isinstance(e, StateDamagedError):  # that one was said once, at start
                logger.error("%s: %s", name, e)  # noqa: TRY400 - the message says it all
            resp = unavailable(
                "state_unavailable", STATE_RETRY_AFTER, request.app[METRICS], detail=str(e)
            )
        counts[name, str(resp.status)] += 1
        return resp

    return wrapped


def add_counted(
    app: web.Application, name: str, routes: Iterable[tuple[str, str, Handler]]
) -> None:
    """Register ``(method, path, handler)`` routes counted as one route ``name``.

    A ``GET`` route answers ``HEAD`` too, as every GET route of the relay.
    """
    for method, path, handler in routes:
        if method == "GET":
            app.router.add_get(path, counted(name, handler))
        else:
            app.router.add_route(method, path, counted(name, handler))

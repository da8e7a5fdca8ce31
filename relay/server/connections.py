"""Connection limits: what a client that never finishes, never reads or never leaves costs.

A relay listens where any host can reach it. Every accepted connection goes through
a :class:`ConnectionGuard`, which wraps aiohttp's protocol (``web.RequestHandler``)
with a thin one of its own and enforces:

* a cap on open connections: at the cap, a new connection takes the place of the
  connection that has waited longest without a request in progress (idle keep-alive,
  or a head still arriving), which is closed; when every connection has a request
  in progress, the new one gets a canned ``503`` with ``Retry-After`` and is closed
  at once (no parser, no task). Holding idle connections therefore cannot lock
  anyone out. The cap never exceeds three quarters of the open-file limit, so
  files, fills and upstream connections keep descriptors;
* a deadline for a request's head: from its first byte, the request line and
  headers must end (``CRLF CRLF``) within ``header_timeout``, else ``408`` and close;
  they may total at most ``max_request_head`` bytes, else ``431`` and close. Empty
  lines before a request line (which the parser skips) do not end a head, and the
  rest of a body the handler left unread (aiohttp reads it out after the answer) is
  not taken for the next request's head;
* aiohttp's own parser limits: one line or header at most ``max_header_size``, at
  most ``max_headers`` headers (else aiohttp answers ``400``/``431``);
* an idle keep-alive timeout (aiohttp's ``keepalive_timeout``), which also closes a
  connection that never sends a byte;
* slow readers: while a response is being sent and bytes wait in the socket, the
  client must acknowledge at least ``min_send_rate`` bytes per second over each
  ``slow_send_window``, else the connection is aborted (and its handler cancelled,
  so its transfer slot is given back). Progress is read from the kernel
  (``TCP_INFO``: bytes acknowledged, bytes not yet sent), so it covers ``sendfile``
  as well as paced writes. Off where ``TCP_INFO`` is not available (non-Linux).
* running out of file descriptors (``EMFILE``) while accepting: one log line per
  ten seconds with the count, not a traceback per attempt.

Every closing is counted in ``relay_connections_closed_total{reason}``; open
connections in ``relay_connections``.

:class:`GuardedSite` is ``web.SockSite`` with the guard's protocol factory (its
``start`` mirrors aiohttp 3.14's, reading the site's own socket, SSL context and
backlog); the rest of the runner (shutdown, draining) is aiohttp's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import resource
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum, StrEnum, auto
from typing import Any, cast

from aiohttp import StreamReader, web
from aiohttp.web_request import BaseRequest

from relay.config import Config
from relay.metrics import RelayMetrics
from relay.server.state import METRICS

logger = logging.getLogger(__name__)

ServerHandler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]
"""What a ``web.Server`` calls for each request (the application's ``_handle``, wrapped)."""
CLIENT_GONE = 499
"""The status logged for a request whose client left or was cut off (as nginx logs it)."""
_HEAD_END = b"\r\n\r\n"
_LINE_BREAKS = b"\r\n"
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
_TCP_INFO_LEN = 152
_ACKED = struct.Struct("=Q")  # tcpi_bytes_acked at offset 120 (Linux >= 4.1)
_NOTSENT = struct.Struct("=I")  # tcpi_notsent_bytes at offset 144 (Linux >= 4.6)
_ACCEPT_LOG_EVERY = 10.0  # seconds between two "out of file descriptors" lines
_OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def _canned(status: str, retry_after: float | None = None) -> bytes:
    extra = f"Retry-After: {max(1, int(retry_after))}\r\n" if retry_after is not None else ""
    return (f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n{extra}\r\n").encode()


class Closed(StrEnum):
    """Why the guard closed (or refused) a connection: the metric's label."""

    OVER_CAPACITY = auto()
    EVICTED = auto()
    HEADER_TIMEOUT = auto()
    HEAD_TOO_LARGE = auto()
    SLOW_READER = auto()


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The limits of :mod:`relay.server.connections` (``[limits]``; ``0`` turns one off).

    Attributes:
        max_connections: open client connections; the effective cap is also at most
            three quarters of the open-file limit.
        header_timeout: seconds from a request's first byte to the end of its head.
        idle_timeout: seconds a keep-alive connection may wait for its next request.
        max_request_head: bytes of a request line and headers together.
        max_header_size: bytes of the request line, or of one header.
        max_headers: headers in one request.
        min_send_rate: bytes per second a client must take while a response waits.
        slow_send_window: seconds over which ``min_send_rate`` is measured.
        retry_after: seconds told to a client refused past the cap.
    """

    max_connections: int = 10_000
    header_timeout: float = 10.0
    idle_timeout: float = 30.0
    max_request_head: int = 32 * 1024
    max_header_size: int = 8190
    max_headers: int = 64
    min_send_rate: int = 1024
    slow_send_window: float = 60.0
    retry_after: float = 5.0

    @classmethod
    def from_config(cls, config: Config) -> ConnectionLimits:
        """The limits of ``config.limits``."""
        lim = config.limits
        return cls(
            max_connections=lim.max_connections,
            header_timeout=lim.header_timeout,
            idle_timeout=lim.idle_timeout,
            max_request_head=lim.max_request_head,
            max_header_size=lim.max_header_size,
            max_headers=lim.max_headers,
            min_send_rate=lim.min_send_rate,
            slow_send_window=lim.slow_send_window,
            retry_after=lim.retry_after,
        )

    def handler_args(self) -> dict[str, Any]:
        """Keyword arguments for ``web.AppRunner`` (handed on to aiohttp's protocol).

        ``handler_cancellation``: a handler whose client is gone is cancelled, so a
        transfer to an aborted connection (a ``sendfile`` included) ends at once.
        """
        return {
            "keepalive_timeout": self.idle_timeout,
            "max_line_size": self.max_header_size,
            "max_field_size": self.max_header_size,
            "max_headers": self.max_headers,
            "handler_cancellation": True,
        }


def fd_cap(max_connections: int) -> int:
    """``max_connections`` bounded by three quarters of the soft open-file limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    by_files = soft * 3 // 4 if soft != resource.RLIM_INFINITY else max_connections
    if not max_connections:
        return max(1, by_files)
    return max(1, min(max_connections, by_files))


def tcp_progress(sock: socket.socket | None) -> tuple[int, int] | None:
    """``(bytes acknowledged by the peer, bytes queued but not yet sent)``, from ``TCP_INFO``.

    ``None`` where the kernel does not tell (non-Linux, or not a TCP socket).
    """
    option = getattr(socket, "TCP_INFO", None)
    if option is None or sock is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, _TCP_INFO_LEN)
    except OSError:
        return None
    if len(info) < _TCP_INFO_LEN:
        return None
    return _ACKED.unpack_from(info, 120)[0], _NOTSENT.unpack_from(info, 144)[0]


class _Refused(asyncio.Protocol):
    """Past the cap: a canned 503 and close, before reading anything."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream protocol's transport writes; uvloop's do without deriving from asyncio's.
        cast("asyncio.Transport", transport).write(self._answer)
        transport.close()


class _State(Enum):
    WAITING = 0  # no byte of a new request yet
    HEAD = 1  # the head of a request is arriving
    REQUEST = 2  # the head ended: a body, or the handler (until it returns)
    REFUSED = 3  # over the cap, every connection busy: never handed to aiohttp
    UNREAD = 4  # the handler returned before the body ended: aiohttp reads the rest


class GuardedConnection(asyncio.Protocol):
    """One client connection: aiohttp's protocol inside, the guard's bookkeeping around it."""

    __slots__ = (
        "_guard",
        "_head_bytes",
        "_payload",
        "_state",
        "_tail",
        "_timer",
        "cut",
        "inner",
        "slow_acked",
        "slow_since",
        "transport",
    )

    def __init__(self, guard: ConnectionGuard, inner: web.RequestHandler) -> None:
        self._guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self._state = _State.WAITING
        self._head_bytes = 0
        self._tail = b""
        self._timer: asyncio.TimerHandle | None = None
        self._payload: StreamReader | None = None
        self.slow_since: float | None = None
        self.slow_acked = 0
        self.cut = False  # reset by the guard

    @property
    def gone(self) -> bool:
        """Whether the client left or the guard cut the connection."""
        return self.cut or self.transport is None or self.transport.is_closing()

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Register the connection, then hand it to aiohttp."""
        # A stream transport (uvloop's do not derive from asyncio.Transport).
        self.transport = transport = cast("asyncio.Transport", transport)
        if not self._guard.opened(self):
            self._state = _State.REFUSED
            transport.write(self._guard.refusal)
            transport.close()
            return
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        """Time and measure a request's head, then hand the bytes to aiohttp."""
        state = self._state
        if state is _State.UNREAD:
            self.inner.data_received(data)
            payload = self._payload
            if payload is None or payload.is_eof():  # the body ended: the next head starts
                self._state = _State.WAITING
                self._payload = None
            return
        if state is _State.WAITING:
            scan = data
            if data[:1] in (b"\r", b"\n"):
                # Empty lines before a request line: the parser skips them, so does the guard.
                scan = data.lstrip(_LINE_BREAKS)
                if not scan:
                    self.inner.data_received(data)
                    return
            end = scan.find(_HEAD_END)
            if 0 <= end <= self._guard.limits.max_request_head - len(_HEAD_END):
                # The whole head in one read (the common case): nothing to time.
                self._state = _State.REQUEST
                self.inner.data_received(data)
                return
            state = self._state = _State.HEAD
            self._head_bytes = 0
            self._tail = b""
            self._timer = self._guard.loop.call_later(
                self._guard.limits.header_timeout, self._head_timeout
            )
        else:
            scan = data
        if state is _State.HEAD:
            fresh, scan = scan, self._tail + scan
            end = scan.find(_HEAD_END)
            used = len(fresh) if end < 0 else end + len(_HEAD_END) - len(self._tail)
            self._head_bytes += used
            if self._head_bytes > self._guard.limits.max_request_head:
                self._close(Closed.HEAD_TOO_LARGE, "431 Request Header Fields Too Large")
                return
            if end < 0:
                self._tail = scan[-3:]
            else:
                self._state = _State.REQUEST
                self._cancel_timer()
        elif state is _State.REFUSED:
            return
        self.inner.data_received(data)

    def eof_received(self) -> None:
        """Tell aiohttp (it keeps the connection open to answer)."""
        self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection, then tell aiohttp."""
        self._cancel_timer()
        if self._state is _State.REFUSED:
            return
        self._guard.closed(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        """Tell aiohttp's flow control."""
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        """Tell aiohttp's flow control."""
        self.inner.resume_writing()

    # -- requests ----------------------------------------------------------------

    def request_started(self) -> None:
        """The handler runs: the head is complete (whatever the byte scan saw)."""
        self._state = _State.REQUEST
        self._cancel_timer()
        self.slow_since = None
        self._guard.busy(self)

    def request_ended(self, payload: StreamReader) -> None:
        """The handler returned: the next byte after the body starts the next request's head.

        ``payload`` is the request's body: what the handler left unread of it, aiohttp
        reads out before the next request, and it is no head.
        """
        if payload.is_eof():
            self._state = _State.WAITING
        else:
            self._state = _State.UNREAD
            self._payload = payload
        self.slow_since = None
        self._guard.idle(self)

    def abort(self, reason: Closed) -> None:
        """Reset the connection now: what the kernel still holds for it is dropped too.

        The socket is shut down (with a zero linger, so its close is a reset and
        nothing trickles out of an orphaned socket): a ``sendfile`` or a write in
        progress fails at once with a broken pipe, the handler ends, and aiohttp
        closes the transport. (Aborting the transport under a running ``sendfile``
        upsets asyncio's bookkeeping.)
        """
        self._guard.count(reason)
        self.cut = True
        transport = self.transport
        if transport is None:
            return
        try:
            # Through a socket object of our own on the descriptor: uvloop's transport
            # sockets refuse shutdown().
            sock = socket.socket(fileno=transport.get_extra_info("socket").fileno())
        except (OSError, AttributeError):
            transport.abort()
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            transport.abort()
        finally:
            sock.detach()  # the descriptor stays the transport's

    def _head_timeout(self) -> None:
        self._timer = None
        if self._state is _State.HEAD:
            self._close(Closed.HEADER_TIMEOUT, "408 Request Timeout")

    def _close(self, reason: Closed, status: str) -> None:
        self._guard.count(reason)
        self._cancel_timer()
        self._state = _State.REQUEST  # no more head timing for whatever else arrives
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_canned(status))
            self.transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class ConnectionGuard:
    """Applies :class:`ConnectionLimits` to every connection of one application.

    Build it before ``web.AppRunner`` (it adds start/stop hooks to ``app``), pass
    :meth:`ConnectionLimits.handler_args` to the runner, and listen with
    :class:`GuardedSite` (which wraps the runner's request handler: :meth:`install`).
    """

    def __init__(self, app: web.Application, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.cap = fd_cap(limits.max_connections)
        self.metrics: RelayMetrics = app[METRICS]
        self.connections: dict[asyncio.Transport, GuardedConnection] = {}
        # Connections without a request in progress, longest waiting first (evicted first).
        self.waiting: OrderedDict[GuardedConnection, None] = OrderedDict()
        self.in_request: set[GuardedConnection] = set()
        self.refusal = _canned("503 Service Unavailable", limits.retry_after)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._accept_errors = 0
        self._accept_logged = 0.0
        self._previous_handler: (
            Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None
        ) = None
        self._server: web.Server | None = None
        self.metrics.bind(self.metrics.connections, lambda: float(len(self.connections)))
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop (set at start-up)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """The factory ``loop.create_server`` calls once per accepted connection."""

        def make() -> asyncio.Protocol:
            if len(self.connections) >= self.cap and not self.waiting:
                self.count(Closed.OVER_CAPACITY)
                return _Refused(self.refusal)
            return GuardedConnection(self, server())

        return make

    def opened(self, conn: GuardedConnection) -> bool:
        """Track ``conn`` (from its ``connection_made``); False: refuse it, all are busy.

        At the cap the connections waiting longest without a request make room.
        (Accepted connections are made in tasks, so the factory's check alone can
        let a burst past the cap; this one cannot.)
        """
        assert conn.transport is not None
        while len(self.connections) >= self.cap and self.waiting:
            oldest, _ = self.waiting.popitem(last=False)
            self.closed(oldest)
            oldest.abort(Closed.EVICTED)
        if len(self.connections) >= self.cap:
            self.count(Closed.OVER_CAPACITY)
            return False
        self.connections[conn.transport] = conn
        self.waiting[conn] = None
        return True

    def closed(self, conn: GuardedConnection) -> None:
        """Forget ``conn`` (called from its ``connection_lost``)."""
        if conn.transport is not None:
            self.connections.pop(conn.transport, None)
        self.waiting.pop(conn, None)
        self.in_request.discard(conn)

    def busy(self, conn: GuardedConnection) -> None:
        """``conn`` has a request in progress: never evicted, watched for slow reading."""
        self.waiting.pop(conn, None)
        self.in_request.add(conn)

    def idle(self, conn: GuardedConnection) -> None:
        """``conn`` waits for its next request: the newest candidate for eviction."""
        self.in_request.discard(conn)
        if conn.transport is not None and not conn.transport.is_closing():
            self.waiting[conn] = None

    def count(self, reason: Closed) -> None:
        """Count a connection closed or refused for ``reason``."""
        self.metrics.connections_closed.labels(reason.value).inc()

    def install(self, server: web.Server) -> None:
        """Track the requests of ``server``'s guarded connections (once per server).

        Its request handler is wrapped, not the application's: no middleware runs on
        every request for the guard's sake. :class:`GuardedSite` calls it as it starts.
        """
        if self._server is server:
            return
        self._server = server
        server.request_handler = self.track(server.request_handler)

    def track(self, handler: ServerHandler) -> ServerHandler:
        """Wrap ``handler`` to follow the requests of guarded connections.

        A request in progress is never evicted and is watched for slow reading; a
        client gone mid-answer is logged as :data:`CLIENT_GONE`, not traced.
        """
        connections = self.connections

        async def tracked(request: BaseRequest) -> web.StreamResponse:
            conn = connections.get(request.transport)  # type: ignore[arg-type]
            if conn is None:  # not a guarded connection (the leader's private socket)
                return await handler(request)
            conn.request_started()
            try:
                return await handler(request)
            except ConnectionError:
                if not conn.gone:
                    raise
                # The client left, or was cut off: nothing to answer, nothing to trace.
                return web.Response(status=CLIENT_GONE)
            finally:
                conn.request_ended(request.content)

        return tracked

    # -- start, stop, watchdog ---------------------------------------------------

    async def _start(self, _app: web.Application) -> None:
        loop = self.loop
        self._previous_handler = previous = loop.get_exception_handler()
        loop.set_exception_handler(self._exception_handler(previous))
        if self.limits.min_send_rate and self.limits.slow_send_window:
            if getattr(socket, "TCP_INFO", None) is None:
                logger.warning("slow readers are not detected here (no TCP_INFO)")
            else:
                self._watchdog = asyncio.create_task(self._watch(), name="slow-readers")
        logger.info(
            "connections: at most %d open (open-file limit %d), head within %g s and %d "
            "bytes, idle %g s, slow readers under %d B/s over %g s closed",
            self.cap,
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            self.limits.header_timeout,
            self.limits.max_request_head,
            self.limits.idle_timeout,
            self.limits.min_send_rate,
            self.limits.slow_send_window,
        )

    async def _stop(self, _app: web.Application) -> None:
        self.loop.set_exception_handler(self._previous_handler)
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog

    def _exception_handler(
        self, previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None
    ) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
        def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            exc = context.get("exception")
            if isinstance(exc, OSError) and exc.errno in _OUT_OF_RESOURCES:
                self._accept_error(exc)
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        return handle

    def _accept_error(self, exc: OSError) -> None:
        self._accept_errors += 1
        self.metrics.accept_errors.inc()
        now = time.monotonic()
        if now - self._accept_logged >= _ACCEPT_LOG_EVERY:
            logger.error(
                "cannot accept connections: %s (%d times since the last such line; "
                "%d connections open, cap %d)",
                exc.strerror,
                self._accept_errors,
                len(self.connections),
                self.cap,
            )
            self._accept_logged = now
            self._accept_errors = 0

    async def _watch(self) -> None:
        window = self.limits.slow_send_window
        tick = min(1.0, window / 4)
        while True:
            await asyncio.sleep(tick)
            self.check_slow_readers(self.loop.time())

    def check_slow_readers(self, now: float) -> int:
        """Abort the connections sending under the minimum rate for a whole window.

        Returns:
            How many were aborted.
        """
        window = self.limits.slow_send_window
        floor = self.limits.min_send_rate
        aborted = 0
        for conn in list(self.in_request):
            transport = conn.transport
            if transport is None or transport.is_closing():
                continue
            progress = tcp_progress(transport.get_extra_info("socket"))
            if progress is None:
                continue
            acked, notsent = progress
            if not notsent and not transport.get_write_buffer_size():
                conn.slow_since = None  # nothing waits for the client: not its fault
                continue
            if conn.slow_since is None:
                conn.slow_since, conn.slow_acked = now, acked
                continue
            elapsed = now - conn.slow_since
            if elapsed < window:
                continue
            if acked - conn.slow_acked < floor * elapsed:
                conn.abort(Closed.SLOW_READER)
                aborted += 1
            else:
                conn.slow_since, conn.slow_acked = now, acked
        return aborted


LISTEN_BACKLOG = 4096
"""Connections a listening socket queues before they are accepted (the kernel caps it at
``net.core.somaxconn``). aiohttp's 128 overflows when hundreds of clients connect at once:
TCP clients then wait a second to retry, and a connect to a Unix socket (a worker
forwarding to its leader) fails at once."""


class GuardedSite(web.SockSite):
    """``web.SockSite`` whose connections go through a :class:`ConnectionGuard`."""

    __slots__ = ("_guard",)

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, guard: ConnectionGuard) -> None:
        super().__init__(runner, sock, backlog=LISTEN_BACKLOG)
        self._guard = guard

    async def start(self) -> None:
        """Listen on the socket with the guard's protocol factory."""
        await web.BaseSite.start(self)
        server = self._runner.server
        if server is None:
            raise RuntimeError("the runner is not set up")
        self._guard.install(server)
        self._server = await asyncio.get_running_loop().create_server(
            self._guard.protocol_factory(server),
            sock=self._sock,
            ssl=self._ssl_context,
            backlog=self._backlog,
        )

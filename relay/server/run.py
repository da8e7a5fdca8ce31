"""Running a relay as a service: start-up checks, sockets, signals, logs.

Rules:

* Every start-up mistake an operator can make is found before any component
  starts and raised as a :class:`relay.errors.StartupError` (one line; the CLI exits
  2): the data directory or one of its parts is a file or not writable, another
  relay holds the directory, the trusted root is missing or not a TUF root (checked
  with the same verifier the sync uses), the address is not on this host, the port
  is taken or needs privileges.
* One relay per data directory: an exclusive ``flock`` on ``<data_dir>/relay.lock``
  held for the life of the process; the file holds the PID, for the message the
  next one prints. The kernel drops the lock when the process dies, however it dies.
* SIGTERM or SIGINT: stop accepting, close idle keep-alive connections, let
  transfers in flight finish for up to ``relay.drain`` (other requests get
  :data:`OTHER_REQUESTS_GRACE` more once they are done), cut what is left, clean up,
  and log one line saying so. A second SIGTERM or SIGINT cuts at once.
* SIGHUP: re-read the configuration and apply what can change live
  (:func:`relay.server.app.apply_settings`, plus logging here); log what was
  applied and what needs a restart. A file that does not load changes nothing, and
  no connection is touched either way.
* systemd (``Type=notify``): ``READY=1`` once listening, ``RELOADING=1`` then
  ``READY=1`` around a reload, ``STOPPING=1`` on a stop, when ``NOTIFY_SOCKET`` is
  set (sd_notify's datagram protocol, a few lines, no dependency).
* ``admin.listen`` set: a second listening address for ``/v1/admin/`` and ``/ui/``
  (sites of the same application, so one state); the main listener answers 404 for
  them. Empty: they are served on ``relay.listen``, as everything else.
* Access log: one line per request, off with ``relay.access_log = false``. Text:
  Combined Log Format (what log tools parse), the agent id in the user field.
  JSON: one object per line. Both give the body bytes actually sent, ``sendfile``
  included (:data:`relay.server.blobs.BODY_BYTES`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import errno
import fcntl
import functools
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest

from relay.config import Config, EventLoop
from relay.core.protocol import AGENT_ID_HEADER, is_agent_id
from relay.core.verify import TrustSession
from relay.errors import ConfigError, DataDirLockedError, MetadataRejectedError, StartupError
from relay.server.app import make_app
from relay.server.blobs import BODY_BYTES
from relay.server.compose import apply_settings
from relay.server.connections import (
    LISTEN_BACKLOG,
    ConnectionGuard,
    ConnectionLimits,
    GuardedSite,
)
from relay.server.http import PreparedResponse
from relay.server.internal import CHANGES, from_workers, leader_socket
from relay.server.metadata import METADATA_HEADERS, install_fast_path
from relay.server.state import METRICS, STATE
from relay.server.supervisor import WorkerPool
from relay.storage.fsio import ensure_directory
from relay.transfer.gate import TransferGate

logger = logging.getLogger(__name__)

LOCK_NAME = "relay.lock"
OTHER_REQUESTS_GRACE = 2.0
"""Seconds requests other than transfers get once transfers are done, at a stop (a long
poll would otherwise hold the stop for the whole drain time)."""
ACCESS_LOGGER = "relay.access"
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
# Keys a running relay applies on SIGHUP, by section (every key of the section: "*").
# The rest keep their running values until a restart.
LIVE_KEYS: dict[str, frozenset[str]] = {
    "relay": frozenset({"drain", "log_level", "log_format", "public_url"}),
    "limits": frozenset({"*"}),
    "policy": frozenset({"*"}),
    "admin": frozenset({"*"}),
    "store": frozenset({"retry_after"}),
}
_RESTART_ONLY = {
    "admin": frozenset({"listen"}),
    "policy": frozenset({"mode", "parent_url"}),
    "limits": frozenset({"chunk_bytes"}),  # the limiter's chunk bound is set at start
}
_NOT_SERVED = frozenset({"agent"})  # sections `relay serve` does not read


# -- logging -------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """Formats a log record as one JSON object per line.

    Args:
        pid: each line says which process wrote it (``pid``): several serve the relay.
    """

    def __init__(self, *, pid: bool = False) -> None:
        super().__init__()
        self._pid = pid

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as a JSON line."""
        extra = getattr(record, "fields", None)
        out = json_object(
            record.created,
            record.levelname.lower(),
            record.name,
            record.getMessage(),
            record.process if self._pid else None,
            extra if isinstance(extra, dict) else None,
        )
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


def json_object(
    created: float,
    level: str,
    name: str,
    message: str,
    pid: int | None,
    fields: dict[str, Any] | None,
) -> dict[str, Any]:
    """What a JSON log line holds: time, level, logger, message, the process's ID, fields."""
    out: dict[str, Any] = {
        "time": round(created, 3),
        "level": level,
        "logger": name,
        "message": message,
    }
    if pid is not None:
        out["pid"] = pid
    if fields:
        out.update(fields)
    return out


class AccessHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The access log's handler (stderr): JSON objects or bare lines.

    :class:`AccessLogger` hands it each line already formatted (:meth:`write_line`)
    when it is the access logger's only handler and nothing filters: no log record
    is made per request. Records from elsewhere are formatted as usual.

    Args:
        json_lines: JSON objects (``relay.log_format = "json"``), else bare lines.
        pid: JSON lines carry the writing process's ID.
    """

    def __init__(self, *, json_lines: bool, pid: bool) -> None:
        super().__init__()
        self.json_lines = json_lines
        self.pid = os.getpid() if pid else None
        self.setFormatter(
            JsonFormatter(pid=pid) if json_lines else logging.Formatter("%(message)s")
        )

    def alone_on(self, logger: logging.Logger) -> bool:
        """Whether a line of ``logger`` may skip the log record (this handler alone gets it).

        ``logger``'s only handler, nothing filters, nothing propagates.
        """
        return (
            logger.handlers == [self]
            and not logger.filters
            and not self.filters
            and not logger.propagate
            and not logger.disabled
            and self.level <= logging.INFO
        )

    def write_line(self, line: str) -> None:
        """Write one formatted line, as ``emit`` writes a record's."""
        with self.lock:  # type: ignore[union-attr]
            try:
                self.stream.write(line + self.terminator)
                self.flush()
            except RecursionError:
                raise
            except Exception:  # as StreamHandler.emit: reported on stderr, never raised
                self.handleError(logging.makeLogRecord({"msg": line}))


class _ClientFaultFilter(logging.Filter):
    """Client faults that aiohttp logs as errors with a traceback: one line, not above INFO.

    A client that hangs up mid-response is DEBUG; a malformed request (answered 400)
    is INFO. Neither is a fault of the relay.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Demote ``record`` if a client caused it; return whether it is still logged."""
        exc = record.exc_info[1] if record.exc_info else None
        if record.levelno <= logging.INFO or exc is None:
            return True
        if isinstance(exc, ConnectionError):
            level, what = logging.DEBUG, "the client went away"
        elif isinstance(exc, HttpProcessingError):
            level, what = logging.INFO, "a malformed request, answered 400"
        else:
            return True
        detail = " ".join(str(exc).split())[:200]
        record.levelno, record.levelname = level, logging.getLevelName(level)
        record.msg, record.args = f"{record.getMessage()}: {what}: {detail}", None
        record.exc_info = record.exc_text = None
        return logging.getLogger(record.name).isEnabledFor(level)


def log_level(config: Config, verbose: int = 0) -> int:
    """The root log level: ``relay.log_level``, or debug with ``-v``."""
    return logging.DEBUG if verbose else _LEVELS[config.relay.log_level]


def setup_logging(log_format: str, level: int, *, pid: bool = False) -> None:
    """Configure logging for ``text`` or ``json`` output (again on SIGHUP).

    ``pid``: JSON lines carry the writing process's ID (``relay.workers`` above 1).

    Application logs go to stderr at ``level``. Access lines go to stderr too, whatever
    ``level`` is (``relay.access_log`` turns them off): in text mode bare, one Combined
    Log Format line each, so log tools parse them; in JSON mode as JSON objects.
    """
    handler = logging.StreamHandler()
    access_handler = AccessHandler(json_lines=log_format == "json", pid=pid)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(pid=pid))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    access = logging.getLogger(ACCESS_LOGGER)
    access.handlers[:] = [access_handler]
    access.propagate = False
    access.setLevel(logging.INFO)
    # python-tuf logs each key that fails to verify at INFO; the relay's own message
    # names the failure, so that is detail for -v.
    logging.getLogger("tuf").setLevel(logging.NOTSET if level <= logging.DEBUG else logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _ClientFaultFilter) for f in server.filters):
        server.addFilter(_ClientFaultFilter())


# -- access log ------------------------------------------------------------------------

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_NO_BODY = frozenset({204, 304})


def _escape(text: str) -> str:
    """Escape a client-supplied string for a quoted log field (as Apache does)."""
    if text.isprintable() and '"' not in text and "\\" not in text:
        return text
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "backslashreplace"))
    return "".join(out)


def body_bytes(request: BaseRequest, response: web.StreamResponse) -> int:
    """The body bytes sent for ``response`` (headers not counted).

    Blob and delta bodies count what was written or sent with ``sendfile``
    (:data:`relay.server.blobs.BODY_BYTES`); a :class:`PreparedResponse` knows what it
    sent; other responses hold their body.
    """
    if isinstance(response, PreparedResponse):  # metadata: the body unless HEAD
        return response.sent
    if not isinstance(response, web.Response):  # streamed: blobs and deltas count theirs
        sent: int | None = response.get(BODY_BYTES)
        if sent is not None:
            return sent
    if request.method == "HEAD" or response.status in _NO_BODY or response.status < 200:
        return 0
    if isinstance(response, web.Response):
        body = response.body
        if isinstance(body, bytes | bytearray):
            return len(body)
        if body is not None and body.size is not None:
            return body.size
    return 0


@functools.lru_cache(maxsize=4)
def _clf_time(second: int) -> str:
    """``10/Oct/2000:13:55:36 -0700``: local time with its offset, English month names."""
    d = dt.datetime.fromtimestamp(second).astimezone()
    return f"{d.day:02d}/{_MONTHS[d.month - 1]}/{d:%Y:%H:%M:%S %z}"


class AccessLogger(AbstractAccessLogger):
    """One record per request; its message is a Combined Log Format line.

    ``host - agent [time] "request line" status bytes "referer" "user-agent"``, where
    ``agent`` is the ``Relay-Agent-Id`` (``-`` when absent or malformed) and ``bytes``
    the body bytes actually sent (``-`` for none), as Apache's ``combined``. The
    record also carries the fields one by one, which :class:`JsonFormatter` writes
    out: the handler :func:`setup_logging` installs picks text or JSON, so a reload
    switches the format without touching the connections' loggers. When that
    handler (:class:`AccessHandler`) is the only one and nothing filters, the line
    goes to it directly, without a log record.
    """

    def log(self, request: BaseRequest, response: web.StreamResponse, duration: float) -> None:
        """Write the access line; ``duration`` is the request's, in seconds."""
        if request.remote == "":
            return  # over the leader's Unix socket: the worker that forwarded it logs it
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        headers = request.headers
        agent = headers.get(AGENT_ID_HEADER, "")
        agent = agent if agent and is_agent_id(agent) else "-"
        size = body_bytes(request, response)
        method, path, status = request.method, request.raw_path, response.status
        version = request.version
        user_agent = headers.get("User-Agent", "-")
        remote = request.remote
        now = time.time()
        started = _clf_time(int(now - duration))
        line = f"{method} {path} HTTP/{version.major}.{version.minor}"
        message = (
            f'{remote or "-"} - {agent} [{started}] "{_escape(line)}" {status} {size or "-"} '
            f'"{_escape(headers.get("Referer", "-"))}" "{_escape(user_agent)}"'
        )
        handlers = logger.handlers
        sole = handlers[0] if len(handlers) == 1 else None
        direct = sole if isinstance(sole, AccessHandler) and sole.alone_on(logger) else None
        if direct is not None and not direct.json_lines:
            direct.write_line(message)
            return
        fields = {
            "remote": remote,
            "method": method,
            "path": path,
            "status": status,
            "bytes": size,
            "seconds": round(duration, 6),
            "agent": agent,
            "user_agent": user_agent,
        }
        if direct is not None:  # the handler setup_logging installed, alone: no record
            out = json_object(now, "info", logger.name, message, direct.pid, fields)
            direct.write_line(json.dumps(out, separators=(",", ":")))
            return
        # The record is made here, its message already formatted: logger.info would look
        # up the caller's frame and %-format the line, a large share of a small request.
        logger.handle(
            logger.makeRecord(
                logger.name, logging.INFO, "", 0, message, (), None, extra={"fields": fields}
            )
        )


# -- start-up checks -----------------------------------------------------------------


def split_listen(config: Config, key: str = "relay.listen") -> tuple[str, int]:
    """Return (host, port) of ``relay.listen`` (or of ``key``: ``admin.listen``).

    Raises:
        ConfigError: the value is not ``HOST:PORT``.
    """
    listen = _listen_value(config, key)
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit():
        raise ConfigError(key, listen, config.source_of(key), "expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - an empty host means all


def _listen_value(config: Config, key: str) -> str:
    return config.admin.listen if key == "admin.listen" else config.relay.listen


# -- the admin listener ----------------------------------------------------------------

ADMIN_PREFIXES = ("/v1/admin/", "/ui/")
"""Paths served on ``admin.listen`` only, when it is set (``/ui`` itself too)."""


def is_admin_path(path: str) -> bool:
    """Whether ``path`` belongs to the admin API or the status page."""
    return path == "/ui" or path.startswith(ADMIN_PREFIXES)


def _on_any(sockname: Any, listeners: list[tuple[str, int]]) -> bool:  # noqa: ANN401
    if not isinstance(sockname, tuple) or len(sockname) < 2:
        return False
    host, port = sockname[0], sockname[1]
    return any(
        port == bound_port and bound_host in (host, "0.0.0.0", "::")  # noqa: S104
        for bound_host, bound_port in listeners
    )


def admin_listener_only(listeners: list[tuple[str, int]]) -> Any:  # noqa: ANN401
    """Middleware: ``/v1/admin/`` and ``/ui/`` answer 404 unless they came in on ``listeners``.

    Args:
        listeners: the ``(host, port)`` addresses of the admin sockets (a wildcard host
            takes every address of its port).
    """

    @web.middleware
    async def admin_only(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if is_admin_path(request.path):
            transport = request.transport
            sockname = transport.get_extra_info("sockname") if transport is not None else None
            if not _on_any(sockname, listeners):
                raise web.HTTPNotFound(
                    text="the admin API and /ui/ are served on the admin listener only "
                    "(admin.listen)\n"
                )
        return await handler(request)

    return admin_only


class DataDirLock:
    """An exclusive ``flock`` on ``<data_dir>/relay.lock``, which holds the owner's PID."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None
        self._data_dir = data_dir

    def acquire(self) -> None:
        """Take the lock and write this process's PID into the file.

        Raises:
            DataDirLockedError: another process holds it.
            StartupError: the lock file cannot be created.
        """
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StartupError(
                f"relay.data_dir {self._data_dir}",
                f"cannot create {LOCK_NAME}: {e.strerror}",
                "give the directory to the user the relay runs as",
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise DataDirLockedError(str(self._data_dir), pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays: removing it would race with a new owner)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def check_trusted_root(config: Config) -> None:
    """Check that ``upstream.trusted_root`` is a readable TUF root.

    It goes through :class:`relay.core.verify.TrustSession`, the verifier every sync
    starts from, so a file that passes here is one the sync accepts.

    Raises:
        StartupError: the key is not set, or the file is missing, unreadable, not
            JSON, or not a root signed by its own keys.
    """
    key = "upstream.trusted_root"
    path = config.upstream.trusted_root
    fix = "give the root.json the publisher pins (REPO/public/metadata/1.root.json)"
    if str(path) in ("", "."):
        raise StartupError(key, "is not set", f"{fix} (--trusted-root)")
    subject = f"{key} {path}"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise StartupError(subject, f"cannot be read: {e.strerror}", fix) from None
    try:
        json.loads(data)
    except ValueError:
        raise StartupError(subject, "is not JSON", fix) from None
    try:
        TrustSession(data)
    except MetadataRejectedError as e:
        raise StartupError(subject, f"is not a TUF root ({e.reason})", fix) from None


def prepare_data_dir(config: Config) -> DataDirLock:
    """Create and check the data directory, then lock it.

    Blocking (files): call it in a thread from the loop.

    Returns:
        The held lock; release it when the relay stops.

    Raises:
        StartupError: see :func:`relay.storage.fsio.ensure_directory`.
        DataDirLockedError: another relay uses the directory.
    """
    relay = config.relay
    ensure_directory(relay.data_dir, "relay.data_dir")
    lock = DataDirLock(relay.data_dir)
    lock.acquire()
    try:
        for part in (relay.metadata_dir, relay.blobs_dir, relay.deltas_dir, relay.state_dir):
            ensure_directory(part, "relay.data_dir")
    except StartupError:
        lock.release()
        raise
    return lock


def bind(
    config: Config, key: str = "relay.listen", *, reuse_port: bool = False
) -> list[socket.socket]:
    """Open the listening sockets of ``relay.listen`` (one per address of the host name).

    Args:
        config: the configuration.
        key: the address to listen on: ``relay.listen``, or ``admin.listen``.
        reuse_port: let worker processes bind the same address (``SO_REUSEPORT``).
            The port is bound first without it, so a port another program holds
            (with ``SO_REUSEPORT`` or not) is still found taken.

    Raises:
        StartupError: the host name does not resolve, the address is not on this
            host, the port is in use or needs privileges.
        ConfigError: the key is not ``HOST:PORT``.
    """
    host, port = split_listen(config, key)
    subject = f"{key} {_listen_value(config, key)}"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StartupError(
            subject, f"cannot resolve {host!r}: {e.strerror}", "give an address of this host"
        ) from None
    sockets: list[socket.socket] = []
    seen: set[tuple[int, str]] = set()
    try:
        for family, kind, proto, _name, address in infos:
            ip = str(address[0])
            if (family, ip) in seen:
                continue
            seen.add((family, ip))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            # With port 0, every address gets the port the first one was given.
            bound = sockets[0].getsockname()[1] if port == 0 and len(sockets) > 1 else port
            try:
                _listen(sock, (ip, bound, *address[2:]), reuse_port=reuse_port)
            except OSError as e:
                raise _bind_error(subject, ip, port, e) from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _listen(
    sock: socket.socket, address: tuple[Any, ...] | str, *, reuse_port: bool = False
) -> None:
    if sock.family != socket.AF_UNIX:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(address)
    if reuse_port:
        # Set after the bind, which found the port free (no other program holds it),
        # and before listen: workers can bind it too, and the kernel spreads new
        # connections over the sockets of every process.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.listen(1024)
    sock.setblocking(False)  # noqa: FBT003 - the stdlib's signature


def _listening(family: int, address: tuple[Any, ...] | str, *, shared: bool) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if shared:  # binding beside the leader needs the flag before the bind
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _listen(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_shared(family: int, host: str, port: int) -> socket.socket:
    """A worker's listening socket on an address its leader listens on (``SO_REUSEPORT``).

    Raises:
        OSError: the address cannot be bound.
    """
    return _listening(family, (host, port), shared=True)


def private_socket(path: Path) -> socket.socket:
    """A listening Unix socket at ``path``, in a directory only this user can enter.

    A socket left by a relay that died is replaced (the data directory's lock says
    no other relay runs).

    Raises:
        OSError: the directory or the socket cannot be made.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return _listening(socket.AF_UNIX, str(path), shared=False)


def _bind_error(subject: str, host: str, port: int, e: OSError) -> StartupError:
    if e.errno == errno.EADDRINUSE:
        return StartupError(
            subject,
            f"port {port} on {host} is in use by another process",
            f"stop it (`ss -ltnp 'sport = :{port}'` names it) or choose another port",
        )
    if e.errno == errno.EADDRNOTAVAIL:
        return StartupError(
            subject,
            f"address {host} is not on this host",
            "use one of its addresses (`ip -brief address`), or 0.0.0.0 for all of them",
        )
    if e.errno == errno.EACCES:
        return StartupError(
            subject,
            f"port {port} needs privileges",
            "use a port from 1024 up, or grant CAP_NET_BIND_SERVICE",
        )
    return StartupError(subject, f"cannot listen: {e.strerror}", "choose another address")


# -- systemd -----------------------------------------------------------------------


def sd_notify(message: str, environ: dict[str, str] | None = None) -> bool:
    """Send ``message`` to systemd's notification socket, if there is one.

    The protocol is one datagram of ``KEY=VALUE`` lines on the unix socket named by
    ``NOTIFY_SOCKET`` (``@`` at the start: the abstract namespace).

    Returns:
        Whether a message was sent; ``False`` outside systemd or on any error
        (a missed notification must not stop the relay).
    """
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError as e:
        logger.debug("sd_notify to %s failed: %s", address, e)
        return False
    return True


# -- reload ------------------------------------------------------------------------


def _is_live(section: str, key: str) -> bool:
    live = LIVE_KEYS.get(section, frozenset())
    return ("*" in live or key in live) and key not in _RESTART_ONLY.get(section, frozenset())


def split_changes(running: Config, new: Config) -> tuple[Config, list[str], list[str]]:
    """Split the differences between two configurations by when they take effect.

    Returns:
        The configuration to run with (``running`` with the live keys of ``new``),
        the dotted keys applied now, and the dotted keys that need a restart.
    """
    sections: dict[str, Any] = {}
    applied: list[str] = []
    restart: list[str] = []
    for name in (f.name for f in dataclasses.fields(Config)):
        old_section: Any = getattr(running, name)
        new_section: Any = getattr(new, name)
        if name in _NOT_SERVED or not hasattr(old_section, "__dataclass_fields__"):
            continue
        changes = {}
        for key in (k.name for k in dataclasses.fields(old_section)):
            value = getattr(new_section, key)
            if getattr(old_section, key) == value:
                continue
            if _is_live(name, key):
                changes[key] = value
                applied.append(f"{name}.{key}")
            else:
                restart.append(f"{name}.{key}")
        sections[name] = dataclasses.replace(old_section, **changes)
    live = dataclasses.replace(running, **sections, source=new.source, sources=new.sources)
    return live, applied, restart


# -- stopping ----------------------------------------------------------------------


async def drain(
    runner: web.AppRunner,
    gate: TransferGate,
    seconds: float,
    sig: signal.Signals,
    second: asyncio.Future[signal.Signals],
    *,
    workers: asyncio.Future[None] | None = None,
    forward: Callable[[signal.Signals], None] | None = None,
    last: web.BaseSite | None = None,
) -> None:
    """Stop accepting, let transfers finish for up to ``seconds``, then shut down.

    Args:
        runner: the application's runner.
        gate: the transfers in flight.
        seconds: ``relay.drain``.
        sig: the signal that asked for the stop (logged).
        second: resolves with a second stop signal: transfers are cut at once.
        workers: the worker processes' own stop (the leader waits for it).
        forward: passes a second signal on to the workers.
        last: a site stopped only once ``workers`` is done (the leader's socket).
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    for site in list(runner.sites):
        if site is not last:
            await site.stop()  # no new connections
    server = runner.server
    if server is not None and last is None:
        server.pre_shutdown()  # idle keep-alive connections close; busy ones after
    in_flight = gate.active
    idle = asyncio.Event()
    gate.on_idle = idle.set
    if not gate.active:
        idle.set()
    waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(idle.wait()), second}
    await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    if workers is not None:
        if not second.done():
            either: set[asyncio.Future[Any]] = {workers, second}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if second.done() and forward is not None:
            forward(second.result())
        await workers
        if last is not None:
            await last.stop()
        if server is not None:
            server.pre_shutdown()
    interrupted = second.done()
    for task in waiters:
        task.cancel()
    cut = gate.active
    if server is not None:
        # Other requests (check-ins, metadata, long polls) had the same wait; they get
        # a short grace more, within the drain time, unless transfers are cut anyway.
        left = min(seconds - (loop.time() - started), OTHER_REQUESTS_GRACE)
        await server.shutdown(0.1 if cut or interrupted else max(0.1, left))
    why = "by a second signal" if interrupted else f"at relay.drain ({seconds:g} s)"
    logger.log(
        logging.WARNING if cut else logging.INFO,
        "stopped on %s after %.1f s: %d transfers in flight finished, %d cut%s",
        sig.name,
        loop.time() - started,
        in_flight - cut,
        cut,
        f" {why}" if cut else "",
    )


# -- the service ---------------------------------------------------------------------


def _forget_workers(run: Path) -> None:
    """Remove the sockets of workers of an earlier run (their count may have changed)."""
    for stale in run.glob("worker-*.sock"):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


class Service:
    """One running relay: its sockets, application, lock, signals and configuration.

    Args:
        config: the configuration to start with.
        reload: re-reads the configuration (on SIGHUP); ``None``: SIGHUP only logs.
        verbose: ``-v`` given: debug logs whatever ``relay.log_level`` says.
    """

    def __init__(
        self, config: Config, reload: Callable[[], Config] | None = None, verbose: int = 0
    ) -> None:
        self.config = config
        self._reload = reload
        self._verbose = verbose
        self._signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self.app: web.Application | None = None

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Start, serve until SIGTERM or SIGINT, drain and stop.

        Raises:
            StartupError: a start-up check failed (nothing was started).
            ConfigError: a key is missing or malformed.
        """
        loop = asyncio.get_running_loop()
        with self._signal_handlers(loop):
            lock = await asyncio.to_thread(prepare_data_dir, self.config)
            try:
                await asyncio.to_thread(check_trusted_root, self.config)
                shared = self.config.relay.processes > 1
                sockets = bind(self.config, reuse_port=shared)
                try:
                    admin = self._bind_admin()
                    sockets += admin
                    await self._serve(sockets, ready, admin)
                finally:
                    for sock in sockets:
                        sock.close()
            finally:
                lock.release()

    def _bind_admin(self) -> list[socket.socket]:
        if not self.config.admin.listen:
            return []
        if self.config.admin.listen == self.config.relay.listen:
            raise ConfigError(
                "admin.listen",
                self.config.admin.listen,
                self.config.source_of("admin.listen"),
                'is relay.listen: give another address, or "" to serve the admin API there',
            )
        return bind(self.config, "admin.listen")

    @contextlib.contextmanager
    def _signal_handlers(self, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
        installed = []
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                loop.add_signal_handler(sig, self._signals.put_nowait, sig)
            except (ValueError, RuntimeError, NotImplementedError):  # not the main thread
                continue
            installed.append(sig)
        try:
            yield
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)

    async def _serve(
        self,
        sockets: list[socket.socket],
        ready: asyncio.Event | None,
        admin: list[socket.socket],
    ) -> None:
        processes = self.config.relay.processes
        app = self.app = make_app(self.config, processes=processes)
        if processes > 1:
            app.middlewares.insert(0, from_workers)
        if admin:
            app.middlewares.append(admin_listener_only([s.getsockname()[:2] for s in admin]))
        limits = ConnectionLimits.from_config(self.config)
        guard = ConnectionGuard(app, limits)
        runner = web.AppRunner(
            app,
            access_log_class=AccessLogger,
            access_log=logging.getLogger(ACCESS_LOGGER) if self.config.relay.access_log else None,
            handle_signals=False,
            **limits.handler_args(),
        )
        pool: WorkerPool | None = None
        private: web.SockSite | None = None
        try:
            await runner.setup()
            state = app[STATE]
            if runner.server is not None:
                install_fast_path(
                    runner.server,
                    state.mirror.metadata_file,
                    app[METADATA_HEADERS],
                    state.metrics,
                    state.started,
                )
            for sock in sockets:
                await GuardedSite(runner, sock, guard).start()
            for sock in sockets:
                host, port = sock.getsockname()[:2]
                shown = f"[{host}]" if sock.family == socket.AF_INET6 else host
                what = "admin API and /ui/" if sock in admin else "relay"
                logger.info("%s listening on http://%s:%d/", what, shown, port)
            if processes > 1:
                private, pool = await self._start_workers(runner, app, sockets, admin, processes)
            sd_notify(f"READY=1\nSTATUS=listening on {self.config.relay.listen}")
            if ready is not None:
                ready.set()
            while (sig := await self._signals.get()) is signal.SIGHUP:
                await self.reload()
            await self._drain(runner, sig, pool, private)
        finally:
            await runner.cleanup()
            if private is not None:
                with contextlib.suppress(OSError):
                    leader_socket(self.config).unlink()

    async def _start_workers(
        self,
        runner: web.AppRunner,
        app: web.Application,
        sockets: list[socket.socket],
        admin: list[socket.socket],
        processes: int,
    ) -> tuple[web.SockSite, WorkerPool]:
        """Serve the leader's socket, then start the workers and wait until they listen."""
        path = leader_socket(self.config)
        try:
            unix = await asyncio.to_thread(private_socket, path)
            await asyncio.to_thread(_forget_workers, path.parent)
        except OSError as e:
            raise StartupError(
                f"relay.data_dir {self.config.relay.data_dir}",
                f"cannot make {path}: {e.strerror}",
                "give the directory to the user the relay runs as",
            ) from None
        private = web.SockSite(runner, unix, backlog=LISTEN_BACKLOG)
        await private.start()
        app[CHANGES].addresses = [
            (int(sock.family), *sock.getsockname()[:2]) for sock in sockets if sock not in admin
        ]
        metrics = app[METRICS]
        pool = WorkerPool(
            path,
            processes,
            verbose=self._verbose,
            event_loop=self.config.relay.event_loop,
            on_restart=lambda _slot: metrics.worker_restarts.inc(),
        )
        app[CHANGES].starting = True
        try:
            listening = await pool.start()
        finally:
            app[CHANGES].starting = False
        logger.info("%d of %d worker processes listening", listening, processes - 1)
        return private, pool

    async def reload(self) -> None:
        """Re-read the configuration and apply what can change live (SIGHUP)."""
        if self._reload is None or self.app is None:
            logger.info("SIGHUP: no configuration file to re-read")
            return
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            try:
                new = await asyncio.to_thread(self._reload)
                live, applied, restart = split_changes(self.config, new)
                await apply_settings(self.app, live)
            except ConfigError as e:
                logger.error("SIGHUP: configuration not applied, the running one stays: %s", e)  # noqa: TRY400 - one line
                return
            self.config = live
            # Said before the new log settings take over (a new level may hide INFO).
            logger.info(
                "SIGHUP: configuration re-read from %s: applied %s; needs a restart: %s",
                live.source,
                ", ".join(applied) or "no change",
                ", ".join(restart) or "nothing",
            )
            setup_logging(
                live.relay.log_format,
                log_level(live, self._verbose),
                pid=live.relay.processes > 1,
            )
        finally:
            sd_notify("READY=1")

    async def _drain(
        self,
        runner: web.AppRunner,
        sig: signal.Signals,
        pool: WorkerPool | None,
        private: web.SockSite | None,
    ) -> None:
        sd_notify("STOPPING=1")
        second = asyncio.ensure_future(self._stop_signal())
        workers = None
        if pool is not None:
            # The workers drain as this process does; the leader's socket stays open
            # for what they forward until they are gone.
            grace = self.config.relay.drain + OTHER_REQUESTS_GRACE + 5
            workers = asyncio.ensure_future(pool.stop(sig, grace))
        await drain(
            runner,
            runner.app[STATE].gate,
            self.config.relay.drain,
            sig,
            second,
            workers=workers,
            forward=pool.send_signal if pool is not None else None,
            last=private,
        )

    async def _stop_signal(self) -> signal.Signals:
        while (sig := await self._signals.get()) is signal.SIGHUP:
            logger.info("SIGHUP ignored: the relay is stopping")
        return sig


def loop_factory(event_loop: EventLoop) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop ``event_loop`` (``relay.event_loop``) names, for ``asyncio.Runner``.

    uvloop is the default: it spends less CPU per request than the standard library's
    loop (``benchmarks/RESULTS.md``, "Serving"). It has no ``loop.sendfile``, so stored
    blobs go out with ``os.sendfile`` on the socket (:mod:`relay.server.blobs`).
    """
    if event_loop == "uvloop":
        import uvloop  # noqa: PLC0415 - loaded only by the processes that run on it

        return uvloop.new_event_loop
    return asyncio.new_event_loop


async def serve(
    config: Config,
    *,
    reload: Callable[[], Config] | None = None,
    verbose: int = 0,
    ready: asyncio.Event | None = None,
) -> None:
    """Run a relay until SIGTERM or SIGINT (or cancellation); see the module rules.

    Args:
        config: the configuration.
        reload: re-reads the configuration on SIGHUP.
        verbose: the ``-v`` count (debug logs whatever ``relay.log_level`` says).
        ready: set once the relay listens.

    Raises:
        StartupError: a start-up check failed; nothing was started.
        ConfigError: a key is missing or malformed.
    """
    setup_logging(
        config.relay.log_format, log_level(config, verbose), pid=config.relay.processes > 1
    )
    # File opens, reads and fsyncs hop to threads; each hop is short, but many run at
    # once under load, and the default pool (cores + 4) would queue them.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=32, thread_name_prefix="relay-io")
    )
    await Service(config, reload, verbose).run(ready)

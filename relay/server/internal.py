"""The leader's side of worker processes: its private socket, what workers ask it.

With ``relay.workers`` above 1 the relay runs as one leader (the process started as
``relay serve``: sync, fills, state, admin) and worker processes that serve the same
port (:mod:`relay.server.worker`). They talk over Unix sockets in
``<data_dir>/run/`` (mode 0700): the leader serves its whole application on
``leader.sock``; each worker serves its own metrics on ``worker-<slot>.sock``.

Rules:

* A request that came over the leader's socket was forwarded by a worker: its
  client's address is taken from :data:`relay.server.http.CLIENT_ADDRESS_HEADER`,
  and it is marked :data:`relay.server.http.VIA_WORKER` (the worker gates, paces and
  logs it). The header is honoured on that socket only, never from TCP.
* ``/internal/`` routes answer a worker's own requests only: over the leader's
  socket, without a client's address (a worker adds one to every client request it
  forwards, and answers ``/internal/`` from its clients 404 itself). Elsewhere: 404.
* ``GET /internal/v1/changes?since=<generation>`` is a long poll: it answers at once
  when the generation differs from ``since``, else when the verified metadata or the
  live settings change, or at the end of :data:`CHANGES_HOLD` with the same
  generation. The generation is ``<timestamp version>.<settings serial>.<blobs
  removed>``; with ``removed=<count seen>`` the answer names the blobs removed since
  (``gone``; ``null``: more than the leader remembers, forget them all).
* ``GET /internal/v1/settings`` is what a worker runs with: the live configuration
  (:func:`relay.config.config_to_dict`, secrets included: hence the rule above), the
  leader's start time (so ``Last-Modified`` agrees across processes) and the
  listening addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from relay.config import Config, config_to_dict
from relay.server.http import CLIENT_ADDRESS_HEADER, VIA_WORKER, via_worker
from relay.server.state import STATE

RUN_DIR = "run"
LEADER_SOCKET = "leader.sock"
EGRESS_FILE = "egress.shm"
GONE_KEPT = 4096
"""Removed blobs the leader remembers for a worker behind (past that: it forgets them all)."""
CHANGES_HOLD = 30.0
"""Seconds the leader holds a worker's changes poll without a change."""
INTERNAL_PREFIX = "/internal/"
CHANGES_PATH = "/internal/v1/changes"
SETTINGS_PATH = "/internal/v1/settings"
METRICS_PATH = "/internal/metrics"


def run_dir(config: Config) -> Path:
    """``<data_dir>/run``: the processes' private sockets."""
    return config.relay.data_dir / RUN_DIR


def make_run_dir(config: Config) -> Path:
    """Create ``<data_dir>/run`` (mode 0700: only the relay's user enters it); blocking.

    Raises:
        OSError: it cannot be made.
    """
    path = run_dir(config)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def egress_file(config: Config) -> Path:
    """The file the processes share the egress cap through (:mod:`relay.transfer.share`)."""
    return run_dir(config) / EGRESS_FILE


def worker_sockets(config: Config, slots: int) -> dict[int, Path]:
    """Every worker's private socket by slot (the leader's ``/metrics`` asks each)."""
    return {slot: worker_socket(config, slot) for slot in range(1, slots)}


def leader_socket(config: Config) -> Path:
    """The leader's private socket, which its workers forward to."""
    return run_dir(config) / LEADER_SOCKET


def worker_socket(config: Config, slot: int) -> Path:
    """Worker ``slot``'s private socket (its metrics)."""
    return run_dir(config) / f"worker-{slot}.sock"


@dataclass(slots=True)
class Changes:
    """What workers follow: the served generation, the live settings, and where to listen.

    Attributes:
        content: the verified timestamp version (``None`` before the first sync).
        settings: bumped at each reload of the configuration.
        addresses: the leader's listening addresses, ``(family, host, port)``: each
            worker binds the same ones.
        starting: the workers are being started (``/readyz`` waits for them).
        slots: the processes serving the relay, the leader included (1: no workers).
        removed: blobs that left the store so far (evicted, quarantined, removed):
            a worker forgets what it found of them.
    """

    slots: int = 1
    content: int | None = None
    settings: int = 0
    addresses: list[tuple[int, str, int]] = field(default_factory=list)
    starting: bool = False
    removed: int = 0
    _gone: deque[str] = field(
        default_factory=lambda: deque(maxlen=GONE_KEPT), init=False, repr=False
    )
    _changed: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)

    @property
    def generation(self) -> str:
        """``<timestamp version>.<settings serial>.<blobs removed>``."""
        content = self.content if self.content is not None else "-"
        return f"{content}.{self.settings}.{self.removed}"

    def blob_removed(self, sha256: str) -> None:
        """A blob left the store (the store's ``on_removed``)."""
        self.removed += 1
        self._gone.append(sha256)
        self._wake()

    def removed_since(self, seen: int) -> list[str] | None:
        """The digests removed after the first ``seen``; ``None``: more than are kept."""
        missed = self.removed - seen
        if missed <= 0:
            return []
        if missed > len(self._gone):
            return None
        return list(self._gone)[-missed:]

    def new_content(self, timestamp_version: int | None) -> None:
        """A new verified generation is served (and saved)."""
        if timestamp_version != self.content:
            self.content = timestamp_version
            self._wake()

    def new_settings(self) -> None:
        """The live settings changed (SIGHUP)."""
        self.settings += 1
        self._wake()

    def close(self) -> None:
        """Answer every held poll now (the leader stops)."""
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, since: str, hold: float) -> str:
        """Wait until the generation differs from ``since``, at most ``hold`` seconds.

        Returns:
            The generation now.
        """
        if since == self.generation and not self._closed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=hold)
        return self.generation


CHANGES = web.AppKey("worker_changes", Changes)


@web.middleware
async def from_workers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Middleware: a request over the leader's socket is a worker's: its client's address.

    TCP peers always have an address; a Unix socket peer has none (``""``).
    """
    if request.remote != "":
        return await handler(request)
    client = request.headers.get(CLIENT_ADDRESS_HEADER)
    forwarded = request.clone(remote=client) if client else request
    forwarded[VIA_WORKER] = True
    return await handler(forwarded)


def _workers_only(request: web.Request) -> None:
    # A worker's own request: over the leader's socket, and not a client's it forwards
    # (those always carry the client's address).
    if not via_worker(request) or CLIENT_ADDRESS_HEADER in request.headers:
        raise web.HTTPNotFound(text="not found\n")


async def changes(request: web.Request) -> web.Response:
    """``GET /internal/v1/changes?since=``: held until the generation changes."""
    _workers_only(request)
    hub = request.app[CHANGES]
    generation = await hub.wait(request.query.get("since", "")[:64], CHANGES_HOLD)
    seen = request.query.get("removed", "")
    return web.json_response(
        {
            "generation": generation,
            "content": hub.content,
            "settings": hub.settings,
            "removed": hub.removed,
            "gone": hub.removed_since(int(seen)) if seen.isascii() and seen.isdigit() else None,
        }
    )


async def settings(request: web.Request) -> web.Response:
    """``GET /internal/v1/settings``: the configuration and addresses a worker runs with."""
    _workers_only(request)
    state = request.app[STATE]
    hub = request.app[CHANGES]
    return web.json_response(
        {
            "config": config_to_dict(state.config),
            "started": state.started,
            "addresses": hub.addresses,
            "slots": hub.slots,
            "generation": hub.generation,
            "content": hub.content,
            "settings": hub.settings,
            "removed": hub.removed,
        }
    )


def add_internal_routes(app: web.Application, processes: int) -> None:
    """Keep :data:`CHANGES`; with workers (``processes`` above 1), the routes they use.

    A single process has no such routes: its HTTP surface is the relay's alone.
    """
    app[CHANGES] = Changes(slots=processes)
    if processes > 1:
        app.router.add_get(CHANGES_PATH, changes, name="internal-changes")
        app.router.add_get(SETTINGS_PATH, settings, name="internal-settings")


async def close_changes(app: web.Application) -> None:
    """``on_shutdown``: answer the workers' held polls."""
    app[CHANGES].close()

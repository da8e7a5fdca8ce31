"""A worker process: serves the relay's port beside its leader (``relay.workers`` above 1).

The leader (:mod:`relay.server.run`) starts ``python -m relay.server.worker --leader
<socket> --slot <n>`` for slots 1 .. ``workers`` - 1 (:mod:`relay.server.supervisor`).

Rules:

* A worker binds the leader's addresses with ``SO_REUSEPORT``: the kernel spreads
  new connections over every process serving the port.
* It serves from disk what the leader verified and stored, and nothing else:
  ``/metadata/*`` from the generation the leader saved, verified again from the
  pinned root (:class:`relay.cache.mirror.StoredMetadata`); ``/targets/...`` blobs
  present in the store, through the same steps as the leader (decide, gate, send;
  each blob hashed on its first serve by this process). It never writes the data
  directory and never asks an upstream.
* Everything else is forwarded to the leader over its socket
  (:mod:`relay.server.forward`): a blob not stored (the leader starts or joins the
  single fill and the bytes stream through as they arrive), patches, check-ins,
  reports, events, admin, ``/ui/``, ``/metrics``, ``/healthz``, ``/readyz``, and a
  metadata file of an older generation. Transfers it forwards are gated and paced
  here; its access log has the client-facing line.
* It follows the leader with a long poll (``GET /internal/v1/changes``): a new
  generation is read from disk, new settings (SIGHUP on the leader) are fetched
  and applied (limits, rates, transfer caps, logging), a blob the leader removed
  (evicted, or set aside by its scrub) is forgotten with its open file. It ignores
  SIGHUP itself.
* SIGTERM or SIGINT: it drains as the leader does. It stops by itself when the
  leader is gone: ``PR_SET_PDEATHSIG`` (Linux), a parent that changed, or a changes
  poll that keeps failing.
* It never talks to systemd; its metrics are served on its own socket
  (``<data_dir>/run/worker-<slot>.sock``, ``GET /internal/metrics``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from aiohttp import web

from relay.cache.mirror import StoredBlob, StoredMetadata
from relay.cache.singleflight import SingleFlight
from relay.config import Config, EventLoop, config_from_dict
from relay.core.model import Target, is_sha256
from relay.core.protocol import DeltaFormat, formats_from_accept
from relay.core.tokens import SECRET_BYTES
from relay.deltas.service import PatchFile
from relay.errors import ConfigError
from relay.metrics import RelayMetrics
from relay.server.blobs import admit, paced_slot, send_blob, send_patch
from relay.server.compose import (
    AGENT_SECRET_FILE,
    apply_limits,
    freeze_start_up_heap,
    make_limiters,
    open_share,
    read_trusted_root,
)
from relay.server.connections import ConnectionGuard, ConnectionLimits, GuardedSite
from relay.server.forward import Leader, LeaderGoneError, forward
from relay.server.http import COUNTS, agent_key
from relay.server.internal import (
    CHANGES_HOLD,
    CHANGES_PATH,
    INTERNAL_PREFIX,
    METRICS_PATH,
    SETTINGS_PATH,
    worker_socket,
)
from relay.server.metadata import (
    METADATA_HEADERS,
    MetadataHeaders,
    install_fast_path,
    metadata_response,
)
from relay.server.ops import worker_metrics
from relay.server.run import (
    ACCESS_LOGGER,
    AccessLogger,
    bind_shared,
    drain,
    log_level,
    loop_factory,
    private_socket,
    setup_logging,
)
from relay.server.state import AGENT_SECRET, METRICS
from relay.server.supervisor import READY_LINE
from relay.storage.fsio import hash_file
from relay.storage.secret import load_or_create_secret
from relay.transfer.bandwidth import BandwidthLimiter, LiveSchedule, follow_schedule
from relay.transfer.gate import TransferGate
from relay.transfer.openfiles import OpenFileCache

logger = logging.getLogger("relay.server.worker")  # run as __main__ too

LEADER_LOST_AFTER = 5
"""Failed changes polls in a row after which a worker takes its leader for gone."""
RELOAD_TRIES = 20
"""Reads of the metadata directory before a worker gives up on an announced generation."""
_PR_SET_PDEATHSIG = 1
_TRANSFERS = ("/targets/", "/deltas/")


class StoredBlobs:
    """The blobs a worker finds in the leader's store, each hashed once by this process.

    It reads the store and never changes it: a blob missing, of the wrong length or
    with the wrong bytes is the leader's to fetch or set aside (the request is
    forwarded).

    Args:
        blobs_dir: ``<data_dir>/blobs``.
        files: the worker's open files.
    """

    def __init__(self, blobs_dir: Path, files: OpenFileCache) -> None:
        self._dir = blobs_dir / "sha256"
        self._files = files
        self._found: dict[str, float] = {}  # sha256 -> mtime, hashed and found right
        self._hashing: SingleFlight[str, bool] = SingleFlight()

    def path(self, sha256: str) -> Path:
        """Where the store keeps ``sha256``."""
        return self._dir / sha256[:2] / sha256[2:]

    async def find(self, target: Target) -> tuple[StoredBlob, float] | None:
        """The stored blob of ``target`` and its mtime, or ``None`` (forward the request)."""
        sha = target.sha256
        path = self.path(sha)
        mtime = self._found.get(sha)
        if mtime is None:
            try:
                st = await asyncio.to_thread(os.stat, path)
            except FileNotFoundError:
                return None
            if st.st_size != target.length:
                return None
            intact, _ = await self._hashing.run(sha, lambda: self._intact(path, sha))
            if not intact:
                return None
            mtime = self._found[sha] = st.st_mtime
        return StoredBlob(path, target.length), mtime

    async def _intact(self, path: Path, sha256: str) -> bool:
        try:
            observed, _ = await asyncio.to_thread(hash_file, path)
        except OSError:
            return False
        if observed != sha256:
            logger.warning("stored blob %s hashes to %s: left to the leader", sha256, observed)
        return observed == sha256

    def serving(self, _sha256: str) -> contextlib.AbstractContextManager[None]:
        """Nothing to pin: the open file stays readable whatever the leader does."""
        return contextlib.nullcontext()

    async def quarantine(self, sha256: str, why: str) -> None:
        """Forget a blob found damaged or gone: the next request checks it again (or forwards)."""
        logger.info("stored blob %s: %s: left to the leader", sha256, why)
        self.forget(sha256)

    def forget(self, sha256: str) -> None:
        """Forget ``sha256`` (the leader removed it): found and hashed again, or forwarded."""
        self._found.pop(sha256, None)
        self._files.forget(sha256)

    def forget_all(self) -> None:
        """Forget every blob found (the leader removed more than it remembers)."""
        for sha in list(self._found):
            self.forget(sha)


class StoredPatches:
    """The patches a worker finds in the leader's ``<data_dir>/deltas`` (published = verified).

    Args:
        directory: ``<data_dir>/deltas``.
        formats: the relay's formats, in its order of preference.
    """

    def __init__(self, directory: Path, formats: Sequence[DeltaFormat]) -> None:
        self._dir = directory
        self._formats = list(formats)
        self._found: dict[tuple[str, str, DeltaFormat], PatchFile] = {}

    async def find(
        self, src: str, dst: str, accept: Sequence[DeltaFormat] | None
    ) -> PatchFile | None:
        """The best stored patch for the pair among the formats the client accepts."""
        for fmt in self._formats:
            if accept is not None and fmt not in accept:
                continue
            patch = self._found.get((src, dst, fmt))
            if patch is None:
                path = self._dir / src / f"{dst}.{fmt}"
                try:
                    size = (await asyncio.to_thread(path.stat)).st_size
                except FileNotFoundError:
                    continue
                patch = self._found[src, dst, fmt] = PatchFile(path, size, fmt)
            return patch
        return None


@dataclass(slots=True)
class WorkerState:
    """A worker's components (the blob path's :class:`relay.server.state.Serving` too)."""

    config: Config
    metrics: RelayMetrics
    files: OpenFileCache
    gate: TransferGate
    limiter: BandwidthLimiter
    upstream_limiter: BandwidthLimiter  # unused by a worker; kept on the schedule's rates
    schedule: LiveSchedule
    metadata: StoredMetadata
    blobs: StoredBlobs
    patches: StoredPatches
    leader: Leader
    started: float  # the leader's: Last-Modified agrees across processes
    slot: int
    slots: int  # the processes serving the relay, the leader included
    verbose: int = 0
    generation: str = ""
    content: int | None = None
    settings: int = 0
    removed: int = 0  # the leader's count of blobs removed, as last followed
    parent: int = field(default_factory=os.getppid)


WORKER = web.AppKey("worker", WorkerState)


# -- handlers ---------------------------------------------------------------------------


def _count(request: web.Request, route: str, resp: web.StreamResponse) -> web.StreamResponse:
    # Only what this process answers: what it forwards, the leader counts.
    request.app[COUNTS][route, str(resp.status)] += 1
    return resp


async def metadata(request: web.Request) -> web.StreamResponse:
    """``GET/HEAD /metadata/{name}`` from the generation read; others from the leader."""
    st = request.app[WORKER]
    name = request.match_info["name"]
    data = st.metadata.metadata_file(name)
    if data is None:
        return await forward(request, st.leader, st.metrics)
    entry = request.app[METADATA_HEADERS].entry(name, data)
    return _count(request, "metadata", metadata_response(request, entry, st.metrics, st.started))


async def target(request: web.Request) -> web.StreamResponse:
    """``GET/HEAD /targets/...``: a stored blob from disk; a miss through the leader."""
    st = request.app[WORKER]
    tgt = st.metadata.resolve(request.match_info["tail"])
    found = await st.blobs.find(tgt) if tgt is not None else None
    if tgt is None or found is None:
        return await _forward_transfer(request, st)
    blob, mtime = found
    try:
        resp = await send_blob(request, st, st.blobs, tgt, blob, mtime)
    except FileNotFoundError:  # evicted or set aside by the leader since it was found
        await st.blobs.quarantine(tgt.sha256, "no longer in the store")
        return await _forward_transfer(request, st)
    return _count(request, "targets", resp)


async def delta(request: web.Request) -> web.StreamResponse:
    """``GET/HEAD /deltas/{from}/{to}``: a stored patch from disk; else the leader's answer."""
    st = request.app[WORKER]
    src, dst = request.match_info["src"], request.match_info["dst"]
    current = st.metadata.current
    tgt = current.by_sha256.get(dst) if current is not None and is_sha256(src) else None
    accept = formats_from_accept(request.headers.get("Accept"))
    patch = await st.patches.find(src, dst, accept) if tgt is not None else None
    if tgt is None or patch is None:
        return await _forward_transfer(request, st)
    return _count(request, "deltas", await send_patch(request, st, tgt, src, patch, st.started))


async def other(request: web.Request) -> web.StreamResponse:
    """Anything else: the leader's answer."""
    st = request.app[WORKER]
    if request.path.startswith(INTERNAL_PREFIX):
        raise web.HTTPNotFound(text="not found\n")  # the processes' own, never a client's
    if request.path.startswith(_TRANSFERS):
        return await _forward_transfer(request, st)
    return await forward(request, st.leader, st.metrics)


async def _forward_transfer(request: web.Request, st: WorkerState) -> web.StreamResponse:
    """A blob or patch through the leader, gated and paced here as a local one."""
    if request.method != "GET":
        return await forward(request, st.leader, st.metrics)
    agent = agent_key(request)
    if (refused := admit(st, agent)) is not None:
        return refused
    with paced_slot(st, agent) as pace:
        return await forward(request, st.leader, st.metrics, pace)


# -- composition ------------------------------------------------------------------------


async def build_state(
    leader: Leader, settings: dict[str, Any], slot: int, verbose: int = 0
) -> WorkerState:
    """A worker's components from the leader's settings (reads the trusted root).

    Raises:
        ConfigError: the settings are malformed, or the trusted root cannot be read.
    """
    config = config_from_dict(settings["config"])
    metrics = RelayMetrics()
    schedule, egress, upstream = make_limiters(config, metrics)
    root = await asyncio.to_thread(read_trusted_root, config)
    files = OpenFileCache()
    limits = config.limits
    st = WorkerState(
        config=config,
        metrics=metrics,
        files=files,
        gate=TransferGate(limits.max_transfers, limits.max_transfers_per_agent),
        limiter=egress,
        upstream_limiter=upstream,
        schedule=schedule,
        metadata=StoredMetadata(root, config.relay.metadata_dir),
        blobs=StoredBlobs(config.relay.blobs_dir, files),
        patches=StoredPatches(
            config.relay.deltas_dir, [DeltaFormat(f) for f in config.delta.formats]
        ),
        leader=leader,
        started=float(settings["started"]),
        slot=slot,
        slots=int(settings["slots"]),
        verbose=verbose,
        settings=int(settings["settings"]),
        removed=int(settings["removed"]),
    )
    metrics.bind(metrics.active_transfers, lambda: float(st.gate.active))
    await _reload(st, settings.get("content"))
    st.generation = str(settings["generation"])
    return st


def make_worker_app(st: WorkerState, secret: bytes) -> web.Application:
    """The worker's application: local metadata and blobs, the rest forwarded."""
    app = web.Application(client_max_size=1024 * 1024)
    app[WORKER] = st
    app[METRICS] = st.metrics
    app[AGENT_SECRET] = secret
    app[METADATA_HEADERS] = MetadataHeaders()
    app[COUNTS] = st.metrics.requests.values
    app.router.add_get("/metadata/{name}", metadata)
    app.router.add_get("/targets/{tail:.+}", target)
    app.router.add_get("/deltas/{src}/{dst}", delta)
    app.router.add_route("*", "/{tail:.*}", other)
    app.cleanup_ctx.append(_background)
    return app


async def _background(app: web.Application) -> AsyncIterator[None]:
    st = app[WORKER]
    tasks = [
        asyncio.create_task(follow_schedule(st.schedule, st.limiter, st.upstream_limiter)),
    ]
    share = await open_share(st.config, st.slot, st.slots)
    if share is not None:  # this process's part of the one egress cap
        tasks.append(asyncio.create_task(share.run(st.limiter)))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if share is not None:
            share.close()
        st.files.close()
        await st.leader.close()


async def _reload(st: WorkerState, announced: object) -> None:
    """Read the generation the leader announced (it may be mid-way through the next)."""
    for _ in range(RELOAD_TRIES):
        try:
            served = await st.metadata.reload()
        except OSError as e:
            logger.warning("metadata directory cannot be read: %s", e)
            served = None
        if announced is None or (served is not None and served >= int(str(announced))):
            st.content = served
            return
        await asyncio.sleep(0.1)
    logger.warning("generation %s not read from disk; serving %s", announced, st.content)


async def apply_settings(st: WorkerState, settings: dict[str, Any]) -> None:
    """Run with the leader's new settings (its SIGHUP).

    Raises:
        ConfigError: the settings are malformed; nothing was applied.
    """
    config = config_from_dict(settings["config"])
    apply_limits(config, st.schedule, st.limiter, st.upstream_limiter, st.gate)
    st.config = config
    st.settings = int(settings["settings"])
    setup_logging(config.relay.log_format, log_level(config, st.verbose), pid=True)
    logger.info("worker %d: settings of the leader applied", st.slot)


def _forget_removed(st: WorkerState, answer: dict[str, Any]) -> None:
    """Forget the blobs the leader removed (evicted, or quarantined by its scrub)."""
    removed = answer.get("removed")
    if not isinstance(removed, int) or removed == st.removed:
        return
    gone = answer.get("gone")
    if isinstance(gone, list):
        for sha in gone:
            st.blobs.forget(str(sha))
    else:
        st.blobs.forget_all()
    st.removed = removed


async def follow_leader(st: WorkerState, stop: asyncio.Queue[signal.Signals]) -> None:
    """Follow the leader's changes until it is gone (then ask for a stop)."""
    failures = 0
    while True:
        try:
            query = {"since": st.generation, "removed": str(st.removed)}
            answer = await st.leader.get_json(CHANGES_PATH, query, timeout=CHANGES_HOLD + 30)
        except LeaderGoneError as e:
            failures += 1
            if failures >= LEADER_LOST_AFTER or os.getppid() != st.parent:
                logger.error("worker %d: the leader is gone (%s): stopping", st.slot, e)  # noqa: TRY400 - one line
                stop.put_nowait(signal.SIGTERM)
                return
            await asyncio.sleep(0.2 * 2**failures)
            continue
        failures = 0
        _forget_removed(st, answer)
        try:
            if answer.get("content") != st.content:
                await _reload(st, answer.get("content"))
            if answer.get("settings") != st.settings:
                await apply_settings(st, await st.leader.get_json(SETTINGS_PATH, timeout=30))
        except (LeaderGoneError, ConfigError, KeyError, ValueError) as e:
            logger.warning("worker %d: change not applied: %s", st.slot, e)
            await asyncio.sleep(1)
            continue
        st.generation = str(answer.get("generation", ""))


# -- the process ------------------------------------------------------------------------


def die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this process when its parent dies (best effort)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


async def _first_settings(leader: Leader, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await leader.get_json(SETTINGS_PATH, timeout=10)
        except LeaderGoneError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@contextlib.contextmanager
def _signals(queue: asyncio.Queue[signal.Signals]) -> Iterator[None]:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, queue.put_nowait, sig)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the leader's settings rule
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


def _announce_listening() -> None:
    """Tell the leader (one line on stdout), then point stdout at /dev/null."""
    os.write(1, READY_LINE)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)


async def run_worker(socket_path: Path, slot: int, verbose: int = 0) -> None:
    """Serve as worker ``slot`` of the leader at ``socket_path`` until stopped.

    Raises:
        LeaderGoneError: the leader did not give its settings.
        ConfigError: its settings are malformed.
        OSError: an address or the worker's socket cannot be bound.
    """
    setup_logging("text", logging.DEBUG if verbose else logging.INFO)
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=32, thread_name_prefix="relay-io")
    )
    queue: asyncio.Queue[signal.Signals] = asyncio.Queue()
    with _signals(queue):
        leader = Leader(socket_path)
        settings = await _first_settings(leader)
        st = await build_state(leader, settings, slot, verbose)
        config = st.config
        setup_logging(config.relay.log_format, log_level(config, verbose), pid=True)
        secret = await asyncio.to_thread(
            load_or_create_secret, config.relay.data_dir / AGENT_SECRET_FILE, SECRET_BYTES
        )
        app = make_worker_app(st, secret)
        limits = ConnectionLimits.from_config(config)
        guard = ConnectionGuard(app, limits)
        runner = web.AppRunner(
            app,
            access_log_class=AccessLogger,
            access_log=logging.getLogger(ACCESS_LOGGER) if config.relay.access_log else None,
            handle_signals=False,
            **limits.handler_args(),
        )
        own = web.Application()
        own[METRICS] = st.metrics
        own.router.add_get(METRICS_PATH, worker_metrics)
        own_runner = web.AppRunner(own, access_log=None, handle_signals=False)
        sockets: list[socket.socket] = []
        try:
            await runner.setup()
            if runner.server is not None:
                install_fast_path(
                    runner.server,
                    st.metadata.metadata_file,
                    app[METADATA_HEADERS],
                    st.metrics,
                    st.started,
                )
            await own_runner.setup()
            for family, host, port in settings["addresses"]:
                sockets.append(bind_shared(int(family), str(host), int(port)))
            for sock in sockets:
                await GuardedSite(runner, sock, guard).start()
            own_sock = await asyncio.to_thread(private_socket, worker_socket(config, slot))
            sockets.append(own_sock)
            await web.SockSite(own_runner, own_sock).start()
            freeze_start_up_heap()
            _announce_listening()
            follower = asyncio.create_task(follow_leader(st, queue))
            sig = await queue.get()
            follower.cancel()
            second: asyncio.Future[signal.Signals] = asyncio.ensure_future(queue.get())
            await drain(runner, st.gate, config.relay.drain, sig, second)
            second.cancel()
        finally:
            await own_runner.cleanup()
            await runner.cleanup()
            for sock in sockets:
                sock.close()
            await asyncio.to_thread(worker_socket(config, slot).unlink, missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    """``python -m relay.server.worker --leader SOCKET --slot N [--event-loop L] [-v]``.

    Returns:
        The exit status.
    """
    parser = argparse.ArgumentParser(
        prog="relay-worker", description="a worker process of a relay (started by its leader)"
    )
    parser.add_argument("--leader", type=Path, required=True, help="the leader's socket")
    parser.add_argument("--slot", type=int, required=True, help="this worker's number (1..)")
    parser.add_argument(
        "--event-loop",
        choices=get_args(EventLoop),
        default="uvloop",
        help="relay.event_loop of the leader (uvloop)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="debug logs")
    args = parser.parse_args(argv)
    die_with_parent()
    try:
        with asyncio.Runner(loop_factory=loop_factory(args.event_loop)) as runner:
            runner.run(run_worker(args.leader, args.slot, args.verbose))
    except (LeaderGoneError, ConfigError, OSError) as e:
        print(f"relay worker {args.slot}: {e}", file=sys.stderr)  # noqa: T201 - the CLI's line
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

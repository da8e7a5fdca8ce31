"""The composition root: builds one relay's components, runs its background work.

Rules:

* Every component is built here, once, as a named object, and handed what it
  needs through its constructor; nothing reaches into another's private state.
* Everything with a lifetime (the client session, the state store, the delta
  engine's processes, background tasks) is opened and closed by
  :func:`components`, the application's ``cleanup_ctx``.
* Configuration is passed in as a :class:`relay.config.Config`; nothing is read
  from the environment here.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import gc
import logging
from collections.abc import AsyncIterator, Callable
from functools import partial
from pathlib import Path

import aiohttp
from aiohttp import web

from relay.cache.mirror import Mirror
from relay.cache.store import Fill, FsBlobStore
from relay.cache.upstream import AiohttpFetcher, Upstream, UpstreamHealth
from relay.config import Config
from relay.core.model import Target
from relay.core.policy import Prefetch
from relay.core.protocol import DeltaFormat
from relay.core.schedule import GroupSettings
from relay.core.tokens import SECRET_BYTES
from relay.core.verify import VerifiedMetadata
from relay.deltas.engine import DeltaBudget, DeltaEngine
from relay.deltas.service import DeltaService
from relay.errors import ConfigError
from relay.fleet.approvals import PolicyStore, override_lines, settings_from_config
from relay.fleet.registry import Registry
from relay.metrics import RelayMetrics
from relay.server.events import EVENTS, EventHub, follow_mirror, follow_upstream
from relay.server.fleet import watch_fleet
from relay.server.internal import CHANGES, egress_file, make_run_dir
from relay.server.replica import follow_parent
from relay.server.retention import PinPolicy
from relay.server.state import AGENT_SECRET, CONFIG, METRICS, STATE, RelayState
from relay.storage.kv import KV, shows_earlier_use
from relay.storage.secret import load_or_create_secret
from relay.transfer.bandwidth import (
    BandwidthLimiter,
    LiveSchedule,
    follow_schedule,
    schedule_from_config,
)
from relay.transfer.gate import TransferGate
from relay.transfer.openfiles import OpenFileCache
from relay.transfer.share import EgressShare

logger = logging.getLogger(__name__)

AGENT_SECRET_FILE = "agent-token.key"  # noqa: S105 - a file name
"""The key of agent tokens, in the data directory (mode 0600, made at first start)."""


def read_trusted_root(config: Config) -> bytes:
    """Read the pinned root named by ``upstream.trusted_root``.

    Raises:
        ConfigError: the key is empty or the file cannot be read.
    """
    path = config.upstream.trusted_root
    if not str(path):
        raise ConfigError(
            "upstream.trusted_root", None, config.source_of("upstream.trusted_root"), "is required"
        )
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(
            "upstream.trusted_root",
            str(path),
            config.source_of("upstream.trusted_root"),
            f"cannot be read: {e.strerror}",
        ) from e


async def apply_settings(app: web.Application, config: Config) -> None:
    """Apply to a running relay the settings that can change without a restart.

    Called on SIGHUP with the configuration re-read (:mod:`relay.server.run` keeps
    the other keys at their running values). Applied: ``[limits]`` (rates and
    schedule through the running limiters, whose waiting requests are re-evaluated
    at once; transfer caps), ``[policy]`` defaults (each key follows them unless it was saved
    through the admin API) and the keys read per request (``poll_seconds``,
    ``origin_url``, ``relays``, ``relay.public_url``, ``*.retry_after``), and the
    ``[admin]`` token. Connections are untouched.

    Raises:
        ConfigError: ``admin.token_file`` cannot be read; nothing was applied.
    """
    state = app[STATE]
    token = await asyncio.to_thread(config.admin_token)  # may read a file
    apply_limits(config, state.schedule, state.limiter, state.upstream_limiter, state.gate)
    state.admin_token = token
    state.config = config
    if state.policy.set_defaults(settings_from_config(config.policy)):
        state.on_policy_change()
    state.policy.set_group_defaults(GroupSettings(poll_seconds=config.policy.poll_seconds))
    _log_overrides(state.policy, config)
    app[CHANGES].new_settings()  # worker processes fetch the new settings


def make_limiters(
    config: Config, metrics: RelayMetrics
) -> tuple[LiveSchedule, BandwidthLimiter, BandwidthLimiter]:
    """The rate schedule and the egress and upstream limiters on its rates now.

    Returns:
        ``(schedule, egress, upstream)``; :func:`follow_schedule` keeps them in step.
    """
    limits = config.limits
    schedule = LiveSchedule(schedule_from_config(limits))  # SIGHUP may replace it
    rates = schedule.rates_at(dt.datetime.now().astimezone())
    egress = BandwidthLimiter(rates.egress, rates.per_agent, max_chunk=limits.chunk_bytes)
    upstream = BandwidthLimiter(rates.upstream)
    egress.on_throttle = metrics.throttled_seconds.labels("egress").inc
    upstream.on_throttle = metrics.throttled_seconds.labels("upstream").inc
    metrics.bind(metrics.bandwidth_limit.labels("egress"), lambda: egress.rate)
    metrics.bind(metrics.bandwidth_limit.labels("per_agent"), lambda: egress.per_agent)
    metrics.bind(metrics.bandwidth_limit.labels("upstream"), lambda: upstream.rate)
    return schedule, egress, upstream


def apply_limits(
    config: Config,
    schedule: LiveSchedule,
    egress: BandwidthLimiter,
    upstream: BandwidthLimiter,
    gate: TransferGate,
) -> None:
    """Put running limiters and the transfer caps on ``config``'s ``[limits]`` (a reload)."""
    schedule.apply(schedule_from_config(config.limits), egress, upstream)
    gate.max_total = config.limits.max_transfers
    gate.max_per_agent = config.limits.max_transfers_per_agent


async def open_share(config: Config, slot: int, slots: int) -> EgressShare | None:
    """This process's part of the one egress cap, with several processes (else ``None``).

    Raises:
        OSError: ``<data_dir>/run`` or its shared file cannot be made.
    """
    if slots <= 1:
        return None
    return await asyncio.to_thread(_open_share, config, slot, slots)


def _open_share(config: Config, slot: int, slots: int) -> EgressShare:
    make_run_dir(config)
    path = egress_file(config)
    if slot == 0:  # the leader starts before its workers: a new file, no earlier run's records
        path.unlink(missing_ok=True)
    return EgressShare(path, slot, slots)


def freeze_start_up_heap() -> None:
    """Move what start-up built to the collector's permanent generation (:func:`gc.freeze`).

    Modules, the application and the loaded state live as long as the process: full
    collections need not walk them (reference counting still frees what is replaced).
    Garbage is collected first, so none is kept.
    """
    gc.collect()
    gc.freeze()


def _log_overrides(policy: PolicyStore, config: Config) -> None:
    # At start and on SIGHUP: a configured value that a saved one hides is said, once.
    for line in override_lines(policy, config):
        logger.info("%s", line)


def open_state(config: Config) -> KV:
    """The state database, or a damaged stand-in naming the problem (blocking)."""
    relay = config.relay
    used = shows_earlier_use(relay.metadata_dir, relay.blobs_dir)
    return KV.open(relay.state_dir, used=used)


def _up(health: UpstreamHealth) -> Callable[[], float]:
    return lambda: 0.0 if health.failing_since is not None else 1.0


class _ParentDeltas:
    """Rebuilds a target from a parent relay's patch before the full download."""

    def __init__(self, deltas: DeltaService, upstream: Upstream) -> None:
        self._deltas = deltas
        self._upstream = upstream
        self.current: VerifiedMetadata | None = None

    async def fill(self, target: Target, fill: Fill) -> bool:
        return await self._deltas.fill_from_parent(target, fill, self._upstream, self.current)


async def components(app: web.Application) -> AsyncIterator[None]:
    """Build the relay's components into ``app[STATE]``; close them at shutdown.

    Raises:
        ConfigError: no upstream URL, or the trusted root cannot be read.
    """
    config = app[CONFIG]
    metrics = app[METRICS]
    if not config.upstream.urls:
        raise ConfigError(
            "upstream.urls", None, config.source_of("upstream.urls"), "at least one URL is required"
        )
    root = await asyncio.to_thread(read_trusted_root, config)

    # -- the upstream side: one session, one fetcher, one ingress limiter
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=300),
        auto_decompress=False,
        headers={"User-Agent": "relay"},
    )
    limits = config.limits
    schedule, egress_limiter, upstream_limiter = make_limiters(config, metrics)
    upstream = Upstream(
        AiohttpFetcher(
            session,
            connect_timeout=config.upstream.connect_timeout,
            read_timeout=config.upstream.read_timeout,
            min_rate=config.upstream.min_rate,
        ),
        list(config.upstream.urls),
        retries=config.upstream.retries,
        backoff=config.upstream.retry_backoff,
        # Free while unlimited (acquire returns at once); SIGHUP may set a rate.
        throttle=partial(upstream_limiter.acquire, None),
    )
    upstream.on_bytes(lambda base, n: metrics.upstream_bytes.labels(base).inc(n))
    for base in upstream.base_urls:
        metrics.upstream_up.labels(base).set_function(_up(upstream.health[base]))

    # -- the fleet: state store, registry, approvals and settings
    kv = await asyncio.to_thread(open_state, config)  # checks and opens SQLite
    if kv.damaged:
        logger.error(
            "state database %s: serving verified content; approvals, settings and agents "
            "are unknown and changes are refused (503) until `relay state check --repair`",
            kv.damaged,
        )
    registry = Registry(
        kv, max_agents=config.limits.max_agents, idle_expiry=config.limits.agent_expiry
    )
    registry.on_evicted = lambda reason: metrics.agents_evicted.labels(reason).inc()
    await registry.load()
    policy = PolicyStore(
        kv,
        settings_from_config(config.policy),
        replica=config.policy.mode == "replica",
        group_defaults=GroupSettings(poll_seconds=config.policy.poll_seconds),
    )
    await policy.load()
    hub = EventHub(policy, hold=config.events.hold, splay=config.events.splay)
    app[EVENTS] = hub
    metrics.bind(metrics.events_held, lambda: float(hub.waiting))
    _log_overrides(policy, config)

    # -- the cache and the deltas, with the pin policy between them
    pins = PinPolicy(policy=policy, registry=registry, keep_versions=config.store.keep_versions)
    store = FsBlobStore(config.relay.blobs_dir, max_bytes=config.store.max_bytes, pinned=pins.pins)
    dcfg = config.delta
    deltas = DeltaService(
        directory=config.relay.deltas_dir,
        engine=DeltaEngine(
            workers=dcfg.workers,
            budget=DeltaBudget.from_settings(dcfg),
        ),
        store=store,
        metrics=metrics,
        formats=[DeltaFormat(f) for f in dcfg.formats],
        bases=dcfg.bases,
        max_queued=dcfg.max_queued,
    )
    pins.deltas = deltas
    parent_deltas = _ParentDeltas(deltas, upstream) if dcfg.enabled else None
    mirror = Mirror(
        trusted_root=root,
        upstream=upstream,
        store=store,
        metadata_dir=config.relay.metadata_dir,
        metrics=metrics,
        prefetch=Prefetch(config.sync.prefetch),
        retention=pins,
        delta_fill=parent_deltas.fill if parent_deltas is not None else None,
    )
    await mirror.open()
    await deltas.open()

    state = RelayState(
        config=config,
        metrics=metrics,
        upstream=upstream,
        mirror=mirror,
        deltas=deltas,
        registry=registry,
        policy=policy,
        files=OpenFileCache(),
        gate=TransferGate(limits.max_transfers, limits.max_transfers_per_agent),
        limiter=egress_limiter,
        upstream_limiter=upstream_limiter,
        schedule=schedule,
    )
    app[STATE] = state
    state.admin_token = await asyncio.to_thread(config.admin_token)  # may read a file
    app[AGENT_SECRET] = await asyncio.to_thread(
        load_or_create_secret, config.relay.data_dir / AGENT_SECRET_FILE, SECRET_BYTES
    )
    metrics.bind(metrics.active_transfers, lambda: float(state.gate.active))
    watch_fleet(state)
    metrics.cache_max_bytes.set(config.store.max_bytes)
    store.on_removed.append(state.files.forget)
    store.on_evicted.append(lambda _sha, _size: metrics.evictions.inc())

    def track(verified: VerifiedMetadata | None) -> None:
        pins.current = deltas.current = verified
        if parent_deltas is not None:
            parent_deltas.current = verified

    async def prefetch_then_diff(verified: VerifiedMetadata) -> None:
        if mirror.prefetch is not Prefetch.NONE:
            await mirror.prefetch_now()
        if dcfg.enabled:
            await deltas.compute_all(verified)

    changes = app[CHANGES]

    async def after_sync(verified: VerifiedMetadata) -> None:
        track(verified)
        changes.new_content(verified.timestamp_version)  # saved: worker processes reload it
        state.spawn(prefetch_then_diff(verified), "prefetch")

    track(mirror.current)
    changes.new_content(mirror.current.timestamp_version if mirror.current else None)
    store.on_removed.append(changes.blob_removed)  # workers forget what they found of it
    mirror.listeners.append(after_sync)
    follow_mirror(hub, mirror)

    # -- background work: loops supervised (restarted with back-off, shown in /readyz)
    bg = state.background
    bg.supervise("sync", partial(mirror.run_sync_loop, config.sync.interval, config.sync.jitter))
    bg.supervise(
        "upstream-events",
        partial(
            follow_upstream,
            upstream,
            mirror,
            hold=config.events.hold,
            fallback=config.sync.interval,
        ),
    )
    if config.store.scrub_interval:
        bg.supervise("scrub", partial(mirror.run_scrub_loop, config.store.scrub_interval))
    if policy.replica:
        bg.supervise(
            "replica",
            partial(
                follow_parent,
                config,
                upstream.with_base_url(config.policy.parent_url),
                policy,
                state.on_policy_change,
            ),
        )
    # Always followed, windows or not: a reload may add some.
    bg.supervise(
        "rate-schedule", partial(follow_schedule, schedule, egress_limiter, upstream_limiter)
    )
    # With worker processes: one egress cap for all (the leader is slot 0).
    share = await open_share(config, 0, app[CHANGES].slots)
    if share is not None:
        bg.supervise("egress-share", partial(share.run, egress_limiter))
    freeze_start_up_heap()
    try:
        yield
    finally:
        hub.close()
        await bg.close()
        if share is not None:  # the workers have stopped: nothing uses the file now
            share.close()
            await asyncio.to_thread(share.path.unlink, missing_ok=True)
        await deltas.close()
        await mirror.close()
        state.files.close()
        await session.close()
        await registry.close()
        kv.close()

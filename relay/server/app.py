"""The relay's aiohttp application: components, background tasks and routes.

Rules:

* Everything with a lifetime (client session, blob store, mirror, delta engine,
  background tasks) is created and torn down by ``app.cleanup_ctx`` and stored
  under a typed ``AppKey``; nothing lives in module globals.
* Configuration is passed in as a :class:`relay.config.Config`; nothing is read
  from the environment here.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

from relay.cache.mirror import Mirror, Prefetch
from relay.cache.store import Fill, FsBlobStore
from relay.cache.upstream import AiohttpFetcher, Upstream, UpstreamHealth
from relay.config import Config
from relay.core.model import Target
from relay.core.policy import (
    PolicyState,
    Settings,
    declined_everywhere,
    pinned_digests,
    should_prefetch,
)
from relay.core.protocol import DeltaFormat
from relay.core.verify import VerifiedMetadata
from relay.deltas.engine import (
    DeltaBudget,
    DeltaEngine,
)
from relay.deltas.service import DeltaService
from relay.errors import ConfigError
from relay.fleet.approvals import PolicyStore, settings_from_config
from relay.fleet.registry import Registry
from relay.metrics import RelayMetrics
from relay.server.admin import ADMIN_TOKEN
from relay.server.bandwidth import BandwidthLimiter, RateSchedule, schedule_from_config
from relay.server.blobs import OpenFileCache
from relay.storage.kv import KV

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class TransferGate:
    """Counts transfers in progress, in total and per agent (no I/O).

    ``0`` means unlimited.
    """

    max_total: int
    max_per_agent: int
    active: int = 0
    per_agent: dict[str, int] = field(default_factory=dict)

    def try_enter(self, agent: str) -> str | None:
        """Take a slot; return ``None``, or the reason it was refused."""
        if self.max_total and self.active >= self.max_total:
            return "max_transfers"
        current = self.per_agent.get(agent, 0)
        if self.max_per_agent and current >= self.max_per_agent:
            return "max_transfers_per_agent"
        self.active += 1
        self.per_agent[agent] = current + 1
        return None

    def leave(self, agent: str) -> None:
        """Give a slot back."""
        self.active -= 1
        left = self.per_agent.get(agent, 1) - 1
        if left <= 0:
            self.per_agent.pop(agent, None)
        else:
            self.per_agent[agent] = left


@dataclass(slots=True)
class RelayState:
    """The components of one running relay (stored under :data:`STATE`)."""

    config: Config
    metrics: RelayMetrics
    mirror: Mirror
    files: OpenFileCache
    gate: TransferGate
    registry: Registry
    policy: PolicyStore
    deltas: DeltaService | None = None
    limiter: BandwidthLimiter = field(default_factory=BandwidthLimiter)
    upstream_limiter: BandwidthLimiter = field(default_factory=BandwidthLimiter)
    started: float = field(default_factory=time.time)
    tasks: set[asyncio.Task[object]] = field(default_factory=set)

    def on_policy_change(self) -> None:
        """Fetch what the new policy wants prefetched (in the background)."""
        if self.mirror.prefetch is not Prefetch.NONE:
            self.spawn(self.mirror.prefetch_now(), "prefetch")

    def spawn(self, coro: Coroutine[object, object, object], name: str) -> None:
        """Run ``coro`` as a background task owned by the application."""
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", RelayMetrics)
STATE = web.AppKey("state", RelayState)


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


async def pull_parent_policy(
    config: Config, session: aiohttp.ClientSession, policy: PolicyStore
) -> bool:
    """Copy the parent's approvals and settings (replica mode); True if they changed."""
    token = ""
    if str(config.policy.parent_token_file) not in ("", "."):
        token = (await asyncio.to_thread(config.policy.parent_token_file.read_text)).strip()
    url = config.policy.parent_url.rstrip("/") + "/v1/admin/policy"
    try:
        async with session.get(
            url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
            if resp.status != 200:
                logger.warning("parent policy: HTTP %d from %s", resp.status, url)
                return False
            data = await resp.json()
        new_state = PolicyState.from_dict(data["state"])
        new_settings = Settings.from_dict(data["settings"], base=policy.defaults)
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as e:
        logger.warning("parent policy from %s unusable: %s", url, e)
        return False
    if new_state == policy.state and new_settings == policy.settings:
        return False
    await policy.update(
        state=new_state,
        settings=new_settings,
        local=False,
        audit={"action": "replica-update", "from": config.policy.parent_url},
    )
    return True


async def _follow_parent(
    config: Config, session: aiohttp.ClientSession, policy: PolicyStore, state: RelayState
) -> None:
    while True:
        if await pull_parent_policy(config, session, policy):
            state.on_policy_change()
        await asyncio.sleep(max(5.0, min(config.sync.interval, 60.0)))


async def _apply_schedule(
    schedule: RateSchedule, limiter: BandwidthLimiter, upstream: BandwidthLimiter
) -> None:
    """Re-evaluate time-of-day rates every 30 seconds."""
    while True:
        rates = schedule.rates_at(dt.datetime.now().astimezone())
        limiter.set_rates(rates.egress, rates.per_agent)
        upstream.set_rates(rates.upstream, 0)
        await asyncio.sleep(30)


def _up(health: UpstreamHealth) -> Callable[[], float]:
    return lambda: 0.0 if health.failing_since is not None else 1.0


async def _components(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    metrics = app[METRICS]
    if not config.upstream.urls:
        raise ConfigError(
            "upstream.urls", None, config.source_of("upstream.urls"), "at least one URL is required"
        )
    root = await asyncio.to_thread(read_trusted_root, config)
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=64, ttl_dns_cache=300),
        auto_decompress=False,
        headers={"User-Agent": "relay"},
    )
    fetcher = AiohttpFetcher(
        session,
        connect_timeout=config.upstream.connect_timeout,
        read_timeout=config.upstream.read_timeout,
    )
    limits = config.limits
    schedule = schedule_from_config(
        limits.upstream, limits.egress, limits.per_agent, limits.schedule
    )
    rates = schedule.rates_at(dt.datetime.now().astimezone())
    limiter = BandwidthLimiter(rates.egress, rates.per_agent)
    upstream_limiter = BandwidthLimiter(rates.upstream)

    async def upstream_throttle(n: int) -> None:
        await upstream_limiter.acquire(None, n)

    upstream = Upstream(
        fetcher,
        list(config.upstream.urls),
        retries=config.upstream.retries,
        backoff=config.upstream.retry_backoff,
        throttle=upstream_throttle if schedule.windows or rates.upstream else None,
    )
    upstream.on_bytes(lambda base, n: metrics.upstream_bytes.labels(base).inc(n))
    store = FsBlobStore(config.relay.blobs_dir, max_bytes=config.store.max_bytes)
    dcfg = config.delta
    deltas = DeltaService(
        directory=config.relay.deltas_dir,
        engine=DeltaEngine(
            workers=dcfg.workers,
            budget=DeltaBudget(dcfg.max_memory, dcfg.max_seconds, dcfg.max_ratio, dcfg.zstd_level),
        ),
        store=store,
        metrics=metrics,
        formats=[DeltaFormat(f) for f in dcfg.formats],
        bases=dcfg.bases,
    )
    kv = await asyncio.to_thread(KV, config.relay.state_dir)  # opens SQLite
    registry = Registry(kv)
    await registry.load()
    policy = PolicyStore(
        kv, settings_from_config(config.policy), replica=config.policy.mode == "replica"
    )
    await policy.load()

    def groups() -> list[str]:
        known = {"default"} | {r.group for r in registry.all()}
        known |= {g for (_p, _v, g) in policy.state.approvals if g is not None}
        return sorted(known)

    def wanted(target: Target) -> bool:
        return should_prefetch(policy.state, policy.settings, target, groups())

    def declined(target: Target) -> bool:
        return declined_everywhere(policy.state, policy.settings, target, groups())

    def policy_pins() -> set[str]:
        current = mirror.current
        pins = set(deltas.bases_pinned())
        if current is not None:
            pins |= pinned_digests(
                current.targets.values(), policy.state, policy.settings, groups()
            )
        return pins

    mirror = Mirror(
        trusted_root=root,
        upstream=upstream,
        store=store,
        metadata_dir=config.relay.metadata_dir,
        metrics=metrics,
        prefetch=Prefetch(config.sync.prefetch),
        keep_versions=config.store.keep_versions,
        extra_pins=policy_pins,
        should_prefetch=wanted,
        is_declined=declined,
    )

    async def delta_fill(target: Target, fill: Fill) -> bool:
        if not dcfg.enabled:
            return False
        return await deltas.fill_from_parent(
            target, fill, session, upstream.base_urls, mirror.current
        )

    mirror.delta_fill = delta_fill
    store._pinned = mirror.pinned  # noqa: SLF001 - wiring the pin rule once, here
    for base in upstream.base_urls:
        health = upstream.health[base]
        metrics.upstream_up.labels(base).set_function(_up(health))
    await mirror.open()
    await deltas.open()
    deltas.current = mirror.current
    state = RelayState(
        config=config,
        metrics=metrics,
        mirror=mirror,
        files=OpenFileCache(),
        gate=TransferGate(config.limits.max_transfers, config.limits.max_transfers_per_agent),
        limiter=limiter,
        upstream_limiter=upstream_limiter,
        deltas=deltas,
        registry=registry,
        policy=policy,
    )
    app[ADMIN_TOKEN] = await asyncio.to_thread(config.admin_token)  # may read a file
    limiter.on_throttle = metrics.throttled_seconds.labels("egress").inc
    upstream_limiter.on_throttle = metrics.throttled_seconds.labels("upstream").inc
    metrics.bind(metrics.active_transfers, lambda: float(state.gate.active))
    app[STATE] = state
    store.on_removed.append(state.files.forget)
    store.on_evicted.append(lambda _sha, _size: metrics.evictions.inc())

    async def prefetch_then_diff(verified: VerifiedMetadata) -> None:
        if mirror.prefetch is not Prefetch.NONE:
            await mirror.prefetch_now()
        if dcfg.enabled:
            await deltas.compute_all(verified)

    async def after_sync(verified: VerifiedMetadata) -> None:
        deltas.current = verified
        state.spawn(prefetch_then_diff(verified), "prefetch")

    mirror.listeners.append(after_sync)
    state.spawn(mirror.run_sync_loop(config.sync.interval, config.sync.jitter), "sync")
    if config.store.scrub_interval:
        state.spawn(mirror.run_scrub_loop(config.store.scrub_interval), "scrub")
    if policy.replica:
        state.spawn(_follow_parent(config, session, policy, state), "replica-policy")
    if schedule.windows:
        state.spawn(_apply_schedule(schedule, limiter, upstream_limiter), "rate-schedule")
    try:
        yield
    finally:
        tasks = list(state.tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        await deltas.close()
        await mirror.close()
        state.files.close()
        await session.close()
        kv.close()


def make_app(config: Config, *, metrics: RelayMetrics | None = None) -> web.Application:
    """Build the relay application for ``config``.

    Raises:
        ConfigError: at start-up (in the cleanup context) for a missing trusted
            root or upstream.
    """
    from relay.server import handlers  # noqa: PLC0415 - handlers import this module

    app = web.Application(client_max_size=1024 * 1024)
    app[CONFIG] = config
    app[METRICS] = metrics or RelayMetrics()
    app.cleanup_ctx.append(_components)
    handlers.add_routes(app)
    return app

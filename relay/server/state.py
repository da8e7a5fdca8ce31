"""The running relay's components, and the typed application keys they live under.

This module imports nothing else of the server, so every handler module can
import it without a cycle. The components are built by
:mod:`relay.server.compose` (the composition root) and owned by the
application's ``cleanup_ctx``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from relay.cache.mirror import Mirror
from relay.cache.upstream import Upstream
from relay.config import Config
from relay.core.policy import Prefetch
from relay.deltas.service import DeltaService
from relay.fleet.approvals import PolicyStore
from relay.fleet.registry import Registry
from relay.metrics import RelayMetrics
from relay.server.signin import SignInGuard
from relay.transfer.bandwidth import BandwidthLimiter, LiveSchedule
from relay.transfer.gate import TransferGate
from relay.transfer.openfiles import OpenFileCache

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class LoopHealth:
    """How a supervised background loop is doing (shown by ``/readyz``)."""

    failures: int = 0
    failing_since: float | None = None
    last_error: str = ""

    def to_dict(self) -> dict[str, object]:
        """JSON form."""
        return {
            "failures": self.failures,
            "failing_since": self.failing_since,
            "last_error": self.last_error or None,
        }


class Background:
    """The relay's background work: loops supervised, one-shot tasks watched.

    Rules:

    * A loop that raises is logged with its traceback, counted in
      ``relay_background_failures_total{task}``, and started again after a
      back-off (1 s doubling to 5 minutes); it shows in ``/readyz`` until it
      has run for a minute without failing.
    * A one-shot task's exception is logged with its traceback when it ends.
    * At shutdown every task is cancelled and awaited; errors other than the
      cancellation are logged, not swallowed.
    """

    BACKOFF_MAX = 300.0
    HEALTHY_AFTER = 60.0

    def __init__(self, metrics: RelayMetrics) -> None:
        self._metrics = metrics
        self._tasks: set[asyncio.Task[object]] = set()
        self.health: dict[str, LoopHealth] = {}

    def supervise(self, name: str, loop: Callable[[], Awaitable[object]]) -> None:
        """Run ``loop()`` for the relay's lifetime, restarting it when it fails."""
        self.health[name] = LoopHealth()
        self.spawn(self._supervised(name, loop), name)

    def spawn(self, coro: Coroutine[object, object, object], name: str) -> None:
        """Run ``coro`` once; log its exception if it raises."""
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def running(self) -> set[str]:
        """Names of the tasks running now."""
        return {t.get_name() for t in self._tasks if not t.done()}

    def failing(self) -> dict[str, LoopHealth]:
        """The supervised loops failing now."""
        return {n: h for n, h in self.health.items() if h.failing_since is not None}

    async def close(self) -> None:
        """Cancel every task and wait for it; log errors that are not the cancellation."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, Exception):
                logger.error("background task failed at shutdown", exc_info=result)

    def _done(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("background task %s failed", task.get_name(), exc_info=error)

    async def _supervised(self, name: str, loop: Callable[[], Awaitable[object]]) -> None:
        health = self.health[name]
        delay = 1.0
        while True:
            started = time.monotonic()
            try:
                await loop()
                error: Exception | None = None
            except Exception as e:
                error = e
                logger.exception("background loop %s failed; restarting in %.0f s", name, delay)
            if error is None:
                logger.warning("background loop %s ended; restarting in %.0f s", name, delay)
            if time.monotonic() - started >= self.HEALTHY_AFTER:
                delay = 1.0
            health.failures += 1
            health.failing_since = health.failing_since or time.time()
            health.last_error = f"{type(error).__name__}: {error}" if error else "ended"
            self._metrics.background_failures.labels(name).inc()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.BACKOFF_MAX)
            self.spawn(self._clear_after(health, health.failures), f"{name}-health")

    async def _clear_after(self, health: LoopHealth, failures: int) -> None:
        # A loop is healthy again once it has run HEALTHY_AFTER seconds since its restart.
        await asyncio.sleep(self.HEALTHY_AFTER)
        if health.failures == failures:
            health.failing_since = None


class Serving(Protocol):
    """What serving blobs needs of a process: the leader's :class:`RelayState`, or a worker's."""

    config: Config
    metrics: RelayMetrics
    files: OpenFileCache
    gate: TransferGate
    limiter: BandwidthLimiter


@dataclass(slots=True)
class RelayState:
    """The components of one running relay (stored under :data:`STATE`)."""

    config: Config
    metrics: RelayMetrics
    upstream: Upstream
    mirror: Mirror
    deltas: DeltaService
    registry: Registry
    policy: PolicyStore
    files: OpenFileCache
    gate: TransferGate
    limiter: BandwidthLimiter
    upstream_limiter: BandwidthLimiter
    schedule: LiveSchedule  # the rates both limiters follow by the time of day
    started: float = field(default_factory=time.time)
    background: Background = field(init=False)
    # Read per request (SIGHUP may change it); "" = the admin API is off.
    admin_token: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        self.background = Background(self.metrics)

    def spawn(self, coro: Coroutine[object, object, object], name: str) -> None:
        """Run ``coro`` once in the background; its failure is logged, never lost."""
        self.background.spawn(coro, name)

    def on_policy_change(self) -> None:
        """Fetch what the new policy wants prefetched (in the background)."""
        if self.mirror.prefetch is not Prefetch.NONE:
            self.spawn(self.mirror.prefetch_now(), "prefetch")


CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", RelayMetrics)
STATE = web.AppKey("state", RelayState)
SIGN_INS = web.AppKey("sign_ins", SignInGuard)
"""Failed admin sign-ins per client address (:mod:`relay.server.signin`)."""
AGENT_SECRET = web.AppKey("agent_secret", bytes)
"""The key of agent tokens (:mod:`relay.core.tokens`), from ``<data_dir>/agent-token.key``."""

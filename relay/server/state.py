"""The running relay's components, and the typed application keys they live under.

This module imports nothing else of the server, so every handler module can
import it without a cycle. The components are built by
:mod:`relay.server.compose` (the composition root) and owned by the
application's ``cleanup_ctx``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field

from aiohttp import web

from relay.cache.mirror import Mirror, Prefetch
from relay.cache.upstream import Upstream
from relay.config import Config
from relay.deltas.service import DeltaService
from relay.fleet.approvals import PolicyStore
from relay.fleet.registry import Registry
from relay.metrics import RelayMetrics
from relay.transfer.bandwidth import BandwidthLimiter
from relay.transfer.gate import TransferGate
from relay.transfer.openfiles import OpenFileCache


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
    started: float = field(default_factory=time.time)
    tasks: set[asyncio.Task[object]] = field(default_factory=set)

    def spawn(self, coro: Coroutine[object, object, object], name: str) -> None:
        """Run ``coro`` as a background task owned by the application."""
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def on_policy_change(self) -> None:
        """Fetch what the new policy wants prefetched (in the background)."""
        if self.mirror.prefetch is not Prefetch.NONE:
            self.spawn(self.mirror.prefetch_now(), "prefetch")


CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", RelayMetrics)
STATE = web.AppKey("state", RelayState)
ADMIN_TOKEN = web.AppKey("admin_token", str)

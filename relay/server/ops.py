"""Operations endpoints: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/metrics``."""

from __future__ import annotations

import asyncio
import time

from aiohttp import web

from relay.metrics import CONTENT_TYPE_LATEST
from relay.server.internal import CHANGES
from relay.server.state import STATE


async def healthz(_request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: ``200`` while verified, unexpired metadata is served; else ``503`` and why.

    At start, the relay is ready once its worker processes (``relay.workers``) listen too.

    Agents refuse expired metadata, so a relay whose served timestamp has expired
    is not ready even though it answers.
    """
    state = request.app[STATE]
    mirror = state.mirror
    current = mirror.current
    upstreams = [h.to_dict() for h in mirror.upstream.health.values()]
    expires_in = round(mirror.seconds_until_expiry(), 1) if current else None
    reason = None
    if current is None:
        reason = "no verified metadata yet"
    elif expires_in is not None and expires_in <= 0:
        reason = f"the served timestamp expired {-expires_in:.0f} s ago"
    elif request.app[CHANGES].starting:
        reason = "worker processes starting"
    body: dict[str, object] = {
        "ready": reason is None,
        "reason": reason,
        "timestamp_version": current.timestamp_version if current else None,
        "expires_in_seconds": expires_in,
        "last_sync_ok": mirror.last_sync_ok,
        "seconds_since_last_sync": (
            round(time.time() - mirror.last_sync_ok, 1) if mirror.last_sync_ok else None
        ),
        "last_sync_error": mirror.last_sync_error or None,
        "sync_failing_since": mirror.last_sync_failed_at,
        "upstreams": upstreams,
        "targets": len(current.targets) if current else 0,
    }
    loops = state.background.failing()
    if loops:
        body["failing_loops"] = {name: h.to_dict() for name, h in loops.items()}
    failing = [u for u in upstreams if not u["ok"]]
    if failing:
        body["degraded"] = "upstream unreachable: " + ", ".join(
            f"{u['url']} ({u['last_error']})" for u in failing
        )
    return web.json_response(body, status=200 if reason is None else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    state = request.app[STATE]
    body = await asyncio.to_thread(state.metrics.render)  # the fleet counts walk the agents
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

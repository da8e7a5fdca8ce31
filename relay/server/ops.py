"""Operations endpoints: ``/healthz`` (liveness), ``/readyz`` (readiness), ``/metrics``.

With several processes (``relay.workers``), each worker serves its own registry at
``GET /internal/metrics`` on its Unix socket ``<data_dir>/run/worker-<slot>.sock``
(:func:`worker_metrics`), and the leader's ``/metrics`` is the whole relay's: it
asks every worker at once (:func:`scrape_workers`, a short timeout; a worker that
does not answer is left out of that scrape, ``relay_worker_up{slot}`` says 0 and
``relay_worker_scrape_errors_total{slot}`` counts it) and merges their texts into
its own (:func:`relay.metrics.merge_families`), rendering, parsing and merging in a thread.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.metrics_core import Metric

from relay.metrics import (
    CONTENT_TYPE_LATEST,
    RelayMetrics,
    merge_families,
    parse_families,
    render_families,
)
from relay.server.internal import CHANGES, METRICS_PATH, worker_sockets
from relay.server.state import METRICS, STATE

logger = logging.getLogger(__name__)

WORKER_SCRAPE_TIMEOUT = 2.0  # seconds: a worker slower than this is left out of a scrape


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
    """Prometheus text exposition: the whole relay's (its workers' merged in)."""
    state = request.app[STATE]
    slots = request.app[CHANGES].slots
    if slots > 1:
        body = await merged_metrics(state.metrics, worker_sockets(state.config, slots))
    else:
        body = await asyncio.to_thread(state.metrics.render)  # the fleet counts walk the agents
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def worker_metrics(request: web.Request) -> web.Response:
    """``GET /internal/metrics`` of a worker: its own registry, for the leader to merge."""
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def scrape_worker(path: Path, timeout: float = WORKER_SCRAPE_TIMEOUT) -> list[Metric]:
    """A worker's metric families, fetched from its Unix socket and parsed (in a thread).

    Returns:
        The families.

    Raises:
        aiohttp.ClientError: no answer, or not ``200``.
        TimeoutError: no whole answer within ``timeout`` seconds.
        ValueError: the answer is not the exposition format.
    """
    connector = aiohttp.UnixConnector(path=str(path))
    async with (
        aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as session,
        session.get(f"http://worker{METRICS_PATH}") as response,
    ):
        response.raise_for_status()
        text = await response.text()
    return await asyncio.to_thread(parse_families, text)


async def scrape_workers(
    metrics: RelayMetrics, sockets: Mapping[int, Path], timeout: float = WORKER_SCRAPE_TIMEOUT
) -> list[list[Metric]]:
    """Every worker's families at once; a worker that does not answer is left out and counted.

    Sets ``relay_worker_up{slot}`` (the leader, slot 0, is up) and counts failures in
    ``relay_worker_scrape_errors_total{slot}``. What each slot contributes goes
    through ``metrics.worker_totals`` (:class:`relay.metrics.WorkerTotals`), so the
    relay's counters keep counting what a worker that did not answer, or was
    restarted, had counted.

    Returns:
        The lists of families to merge with the leader's.

    Raises:
        asyncio.CancelledError: the scrape was cancelled.
    """
    results = await asyncio.gather(
        *(scrape_worker(path, timeout) for path in sockets.values()), return_exceptions=True
    )
    metrics.worker_up.labels("0").set(1)
    answered = []
    for slot, result in zip(sockets, results, strict=True):
        up = not isinstance(result, BaseException)
        metrics.worker_up.labels(str(slot)).set(up)
        if isinstance(result, list):
            answered.extend(metrics.worker_totals.answered(slot, result))
        elif isinstance(result, aiohttp.ClientError | OSError | TimeoutError | ValueError):
            metrics.worker_scrape_errors.labels(str(slot)).inc()
            logger.info("worker %d left out of this scrape of /metrics: %r", slot, result)
            answered.extend(metrics.worker_totals.missing(slot))
        else:
            raise result
    return answered


async def merged_metrics(
    metrics: RelayMetrics, sockets: Mapping[int, Path], timeout: float = WORKER_SCRAPE_TIMEOUT
) -> bytes:
    """The relay's metrics: the leader's registry merged with every worker's that answers.

    Returns:
        The text exposition format.

    Raises:
        asyncio.CancelledError: the scrape was cancelled.
    """
    workers = await scrape_workers(metrics, sockets, timeout)
    # In a thread: the leader's fleet counts walk the agents, and parsing is CPU.
    return await asyncio.to_thread(_merge, metrics, workers)


def _merge(metrics: RelayMetrics, workers: list[list[Metric]]) -> bytes:
    own = metrics.render()
    return render_families(merge_families(parse_families(own.decode()), workers))

"""The egress cap with two worker processes: a real ``relay serve`` with ``relay.workers = 2``.

Many clients (each on a connection of its own, which the kernel gives to either
process) download a stored blob at once. Over the measured interval, the bytes the
relay sent (``relay_bytes_served_total`` on its merged ``/metrics``, read at both
ends) stay within the cap times the interval plus 5 %, plus what each process's
bucket may hold (its burst) and one chunk per stream already granted; both
processes sent some (the worker's own count, on its socket). The merged text
passes ``promtool check metrics`` and says the worker is up.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import aiohttp
import pytest

from relay.core.rates import burst_for
from tests.test_monitoring import tool
from tests.test_workers import (  # the fixture and helpers of worker-process tests
    _get,
    _sample,
    relay_workers,  # noqa: F401 - a fixture
    worker_metrics,
)

CAP = 4 * 1024 * 1024  # bytes/s: limits.egress
CHUNK = 64 * 1024  # limits.chunk_bytes (the default)
SIZE = 32 * 1024 * 1024  # no client finishes its blob while the test measures
CLIENTS = 16
WARM_UP = 1.5  # seconds: every client connected, the shares settled
MEASURE = 4.0  # seconds measured


async def _download(url: str) -> None:
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
    async with aiohttp.ClientSession(timeout=timeout) as s, s.get(url) as r:
        assert r.status == 200
        async for _ in r.content.iter_any():
            pass


async def _metrics(relay) -> str:
    async with aiohttp.ClientSession() as s, s.get(relay.url + "metrics") as r:
        assert r.status == 200
        return await r.text()


async def _served(relay) -> tuple[float, float, float]:
    """Bytes served from the cache by the relay and by its worker, and when (monotonic)."""
    text = await _metrics(relay)
    at = time.monotonic()
    worker = _sample(await worker_metrics(relay), "relay_bytes_served_total", source="cache")
    return _sample(text, "relay_bytes_served_total", source="cache"), worker, at


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_egress_cap_with_two_workers(repo, relay_workers):  # noqa: F811 - the fixture
    blob = os.urandom(SIZE)
    tgt = repo.add_bytes(blob, "big.bin", product="big", version="1.0.0")
    relay = await relay_workers(RELAY_LIMITS__EGRESS=str(CAP), RELAY_SYNC__PREFETCH="all")
    path = f"targets/{tgt.url_path}"
    stored = relay.data_dir / "blobs" / "sha256" / tgt.sha256[:2] / tgt.sha256[2:]
    for _ in range(600):  # the leader prefetches it from the origin (no egress)
        if stored.exists():
            break
        await asyncio.sleep(0.05)
    assert stored.exists()
    assert (await _get(relay.url + path, Range="bytes=0-9")) == (206, blob[:10])

    downloads = [asyncio.create_task(_download(relay.url + path)) for _ in range(CLIENTS)]
    try:
        await asyncio.sleep(WARM_UP)
        start = time.monotonic()
        total0, worker0, _ = await _served(relay)
        await asyncio.sleep(MEASURE)
        total1, worker1, end = await _served(relay)
        for download in downloads:
            assert not download.done(), download  # every client still downloading
    finally:
        for download in downloads:
            download.cancel()
        await asyncio.gather(*downloads, return_exceptions=True)

    seconds = end - start
    sent = total1 - total0
    by_worker = worker1 - worker0
    bound = CAP * seconds * 1.05 + 2 * burst_for(CAP) + CLIENTS * CHUNK
    assert sent <= bound, (sent, seconds, bound)
    assert sent >= 0.7 * CAP * seconds, (sent, seconds)  # the cap is used, not wasted
    # Both processes sent (16 connections all to one of two: a 1 in 32768 chance).
    assert 0 < by_worker < sent, (by_worker, sent)

    text = await _metrics(relay)
    assert (
        _sample(text, "relay_worker_up", slot="0")
        == _sample(text, "relay_worker_up", slot="1")
        == 1
    )
    check = await asyncio.to_thread(
        subprocess.run,
        [tool("promtool"), "check", "metrics"],
        input=text.encode(),
        capture_output=True,
    )
    assert check.returncode == 0 and not check.stdout and not check.stderr, check

"""One egress cap over two real processes: their summed bytes stay within the cap.

Each process (``multiprocessing`` spawn) is an aiohttp server on 127.0.0.1 that
streams zeros paced by its own :class:`BandwidthLimiter`, with an
:class:`EgressShare` over one file. A client downloads from both at once: one
agent from the first, three from the second. The bound is on bytes, not rates:
the bytes both sent over the measured interval (their own counts, read at its two
ends on the machine's monotonic clock) stay within ``cap * T`` plus 5 %, plus what
each process's bucket may hold (its burst) and one chunk already granted; both
progressed, and each process got about its agents' part of the cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from multiprocessing.connection import Connection

import aiohttp
import pytest
from aiohttp import web

from relay.core.rates import MAX_CHUNK, burst_for
from relay.transfer.bandwidth import BandwidthLimiter, Pacer
from relay.transfer.share import EgressShare

CAP = 4 * 1024 * 1024  # bytes/s, for the relay as a whole
AGENTS = (1, 3)  # agents downloading from each process
WARM_UP = 1.0  # seconds before measuring: the shares settle within a few periods
MEASURE = 3.0  # seconds measured

pytestmark = pytest.mark.slow


def _serve(path: str, slot: int, slots: int, conn: Connection) -> None:
    asyncio.run(_serve_until_told(path, slot, slots, conn))


async def _serve_until_told(path: str, slot: int, slots: int, conn: Connection) -> None:
    limiter = BandwidthLimiter(CAP, 0)
    sent = 0
    zeros = bytes(MAX_CHUNK)

    async def stream(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        response = web.StreamResponse()
        await response.prepare(request)
        with Pacer(limiter, request.query["agent"]) as pacer:
            while True:
                n = pacer.chunk()
                await pacer.wait(n)
                sent += n  # granted: what the limiter let go
                await response.write(zeros[:n])

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response({"sent": sent, "at": time.monotonic(), "share": limiter.share})

    app = web.Application()
    app.router.add_get("/stream", stream)
    app.router.add_get("/stats", stats)
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    with EgressShare(path, slot, slots) as share:
        keeper = asyncio.create_task(share.run(limiter))
        conn.send(runner.addresses[0][1])
        await asyncio.to_thread(conn.recv)  # until the test says stop
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
    await runner.cleanup()


async def _download(session: aiohttp.ClientSession, url: str) -> None:
    async with session.get(url) as response:
        async for _ in response.content.iter_any():
            pass


async def _stats(session: aiohttp.ClientSession, base: str) -> dict:
    async with session.get(f"{base}/stats") as response:
        return await response.json()


async def test_two_processes_share_one_cap(tmp_path):
    context = multiprocessing.get_context("spawn")
    path = str(tmp_path / "egress.shm")
    processes, pipes = [], []
    try:
        for slot in range(2):
            ours, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(path, slot, 2, theirs), daemon=True)
            process.start()
            processes.append(process)
            pipes.append(ours)
        ports = [await asyncio.to_thread(p.recv) for p in pipes]
        bases = [f"http://127.0.0.1:{port}" for port in ports]
        timeout = aiohttp.ClientTimeout(total=None, sock_read=10)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            downloads = [
                asyncio.create_task(_download(session, f"{base}/stream?agent={slot}-{i}"))
                for slot, (base, agents) in enumerate(zip(bases, AGENTS, strict=True))
                for i in range(agents)
            ]
            await asyncio.sleep(WARM_UP)
            before = [await _stats(session, base) for base in bases]
            await asyncio.sleep(MEASURE)
            after = [await _stats(session, base) for base in bases]
            for download in downloads:
                assert not download.done(), download  # still streaming: none failed
                download.cancel()
            await asyncio.gather(*downloads, return_exceptions=True)
    finally:
        for pipe in pipes:
            with contextlib.suppress(OSError):
                pipe.send("stop")
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()

    sent = [b["sent"] - a["sent"] for a, b in zip(before, after, strict=True)]
    seconds = max(b["at"] for b in after) - min(a["at"] for a in before)
    bound = CAP * seconds * 1.05 + len(bases) * (burst_for(CAP) + MAX_CHUNK)
    assert sum(sent) <= bound, (sent, seconds, bound)
    assert all(n > 0 for n in sent), sent  # both processes progressed
    assert sum(sent) >= 0.7 * CAP * seconds, (sent, seconds)  # and used the cap
    # Every agent of the relay gets about one share: the process with three agents
    # sends about three times what the one with one agent sends.
    assert 1.5 <= sent[1] / sent[0] <= 6, sent
    assert [a["share"] for a in after] == pytest.approx([0.25, 0.75], abs=0.05)

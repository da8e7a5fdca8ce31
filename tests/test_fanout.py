"""Single-flight fan-out: many waiters, one upstream fetch, streamed as bytes arrive."""

from __future__ import annotations

import asyncio
import hashlib
import os

import aiohttp
import pytest

from tests.support import Fault, agent_headers, relay_state, released

SIZE = 2 * 1024 * 1024
BLOB = os.urandom(SIZE)
SHA = hashlib.sha256(BLOB).hexdigest()


@pytest.fixture
def repo(repo):
    return released(repo, BLOB, "big.bin", product="big", version="1.0.0")


async def _relay(serve_relay, repo, **overrides):
    relay = await serve_relay(**{"sync.prefetch": "none", **overrides})
    relay.blob_path = f"/targets/{repo.targets()[0].url_path}"
    return relay


class Download:
    """One client download that records what it received, as it arrives."""

    def __init__(self, session, url, headers):
        self.session, self.url, self.headers = session, url, headers
        self.received = bytearray()
        self.status = None
        self.error = None

    async def run(self):
        try:
            async with self.session.get(self.url, headers=self.headers) as r:
                self.status = r.status
                async for chunk in r.content.iter_any():
                    self.received += chunk
        except aiohttp.ClientError as e:
            self.error = e


async def _fan_out(relay, n, session):
    url = relay.make_url(relay.blob_path)
    downloads = [Download(session, url, agent_headers(relay, f"agent-{i}")) for i in range(n)]
    tasks = [asyncio.create_task(d.run()) for d in downloads]
    return downloads, tasks


def _session():
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


@pytest.mark.timeout(120)
async def test_200_cold_requests_one_upstream_fetch(repo, origin, serve_relay):
    relay = await _relay(serve_relay, repo)
    async with _session() as session:
        downloads, tasks = await _fan_out(relay, 200, session)
        await asyncio.gather(*tasks)
    assert origin.hits[relay.blob_path.removeprefix("/")] == 1
    for d in downloads:
        assert d.error is None and d.status == 200
        assert hashlib.sha256(d.received).hexdigest() == SHA
    metrics = relay_state(relay).metrics
    served = metrics.bytes_served.values
    assert served[("upstream",)] + served[("cache",)] == 200 * SIZE
    # Waiters that joined the fill saved upstream bytes; late ones were cache hits.
    assert metrics.coalesced_bytes._value.get() == served[("upstream",)] - SIZE


async def test_waiters_get_bytes_before_an_upstream_pause(repo, origin, serve_relay):
    half = SIZE // 2
    fault = Fault(pause_at=half, paused=asyncio.Event(), resume=asyncio.Event())
    relay = await _relay(serve_relay, repo)
    origin.faults[relay.blob_path.removeprefix("/")] = fault
    async with _session() as session:
        downloads, tasks = await _fan_out(relay, 20, session)
        await asyncio.wait_for(fault.paused.wait(), 30)
        # While the upstream is paused, every waiter receives what arrived so far.
        for _ in range(1000):
            if all(len(d.received) >= half for d in downloads):
                break
            await asyncio.sleep(0.01)
        assert [len(d.received) for d in downloads] == [half] * 20
        fault.resume.set()
        await asyncio.gather(*tasks)
    assert all(hashlib.sha256(d.received).hexdigest() == SHA for d in downloads)
    assert origin.hits[relay.blob_path.removeprefix("/")] == 1


async def test_upstream_break_is_resumed_invisibly(repo, origin, serve_relay):
    relay = await _relay(serve_relay, repo)
    path = relay.blob_path.removeprefix("/")
    origin.faults[path] = Fault(break_at=SIZE // 3)
    async with _session() as session:
        downloads, tasks = await _fan_out(relay, 30, session)
        await asyncio.gather(*tasks)
    assert all(d.error is None and hashlib.sha256(d.received).hexdigest() == SHA for d in downloads)
    assert origin.hits[path] == 2
    assert any(p == path and r.startswith("bytes=") for p, r in origin.ranges)


async def test_corrupt_upstream_every_waiter_short_read_nothing_cached(repo, origin, serve_relay):
    relay = await _relay(serve_relay, repo)
    origin.faults[relay.blob_path.removeprefix("/")] = Fault(corrupt=True)
    async with _session() as session:
        downloads, tasks = await _fan_out(relay, 30, session)
        await asyncio.gather(*tasks)
    for d in downloads:
        assert d.error is not None or len(d.received) < SIZE
        assert len(d.received) < SIZE  # never a complete-looking body
    state = relay_state(relay)
    assert not state.mirror.store.contains(SHA)
    assert list(state.mirror.store.tmp_dir.iterdir()) == []
    text = state.metrics.render().decode()
    assert 'relay_fills_total{result="HashMismatchError"} 1.0' in text


async def test_a_waiter_that_disconnects_does_not_cancel_the_fill(repo, origin, serve_relay):
    fault = Fault(pause_at=SIZE // 2, paused=asyncio.Event(), resume=asyncio.Event())
    relay = await _relay(serve_relay, repo)
    origin.faults[relay.blob_path.removeprefix("/")] = fault
    async with _session() as session:
        downloads, tasks = await _fan_out(relay, 2, session)
        await asyncio.wait_for(fault.paused.wait(), 30)
        tasks[0].cancel()
        fault.resume.set()
        await asyncio.gather(tasks[1])
    assert hashlib.sha256(downloads[1].received).hexdigest() == SHA
    for _ in range(500):
        if relay_state(relay).mirror.store.contains(SHA):
            break
        await asyncio.sleep(0.01)
    assert relay_state(relay).mirror.store.contains(SHA)


async def test_past_the_concurrency_limit_503_with_retry_after(repo, origin, serve_relay):
    fault = Fault(pause_at=SIZE // 2, paused=asyncio.Event(), resume=asyncio.Event())
    relay = await _relay(serve_relay, repo, **{"limits.max_transfers": 2, "limits.retry_after": 7})
    origin.faults[relay.blob_path.removeprefix("/")] = fault
    async with _session() as session:
        downloads, tasks = await _fan_out(relay, 2, session)
        await asyncio.wait_for(fault.paused.wait(), 30)
        for _ in range(500):
            if relay_state(relay).gate.active == 2:
                break
            await asyncio.sleep(0.01)
        async with session.get(relay.make_url(relay.blob_path)) as r:
            assert r.status == 503
            assert r.headers["Retry-After"] == "7"
        fault.resume.set()
        await asyncio.gather(*tasks)
    assert all(hashlib.sha256(d.received).hexdigest() == SHA for d in downloads)


async def test_per_agent_limit_through_the_relay(repo, origin, serve_relay):
    rate = 512 * 1024
    relay = await _relay(serve_relay, repo, **{"limits.per_agent": rate})
    await relay_state(relay).mirror.prefetch_now()
    loop = asyncio.get_running_loop()
    arrivals = []
    async with _session() as session:

        async def one(agent):
            async with session.get(
                relay.make_url(relay.blob_path), headers=agent_headers(relay, agent)
            ) as r:
                async for chunk in r.content.iter_any():
                    arrivals.append((loop.time(), agent, len(chunk)))

        # Two agents at once: each is held to its own rate, not half of it.
        await asyncio.gather(one("a"), one("b"))
    for agent in ("a", "b"):
        mine = [(t, n) for t, a, n in arrivals if a == agent]
        assert sum(n for _, n in mine) == SIZE
        t0 = mine[0][0]
        window = [(t, n) for t, n in mine if t - t0 >= 0.5]
        measured = sum(n for _, n in window[1:]) / (window[-1][0] - window[0][0])
        assert measured == pytest.approx(rate, rel=0.2)
        gaps = [b[0] - a[0] for a, b in zip(mine, mine[1:])]
        assert max(gaps) < 1.0
    assert (
        relay_state(relay)
        .metrics.render()
        .decode()
        .count('relay_throttled_seconds_total{limiter="egress"}')
        == 1
    )

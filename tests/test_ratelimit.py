"""Rate arithmetic (pure, table-driven) and the asyncio limiter's behaviour."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from relay.ratelimit import (
    MAX_GAP,
    BandwidthLimiter,
    Pacer,
    Rates,
    RateSchedule,
    TokenBucket,
    Window,
    chunk_size,
    jain_index,
)


@pytest.mark.parametrize(
    ("rate", "burst", "steps", "expected"),
    [
        (100, 10, [(10, 0.0)], [0.0]),  # within the burst
        (100, 10, [(10, 0.0), (50, 0.0)], [0.0, 0.5]),  # debt of 50 at 100/s
        (100, 10, [(60, 0.0), (10, 1.0)], [0.5, 0.0]),  # paid back after a second
        (100, 10, [(10, 0.0), (10, 0.0), (10, 0.0)], [0.0, 0.1, 0.2]),  # queue in order
        (0, 0, [(10**9, 0.0)], [0.0]),  # 0 = unlimited
        (100, 10, [(10, 0.0), (10, 100.0)], [0.0, 0.0]),  # idle refill is capped at the burst
    ],
)
def test_token_bucket(rate, burst, steps, expected):
    bucket = TokenBucket(rate, burst, now=0.0)
    got = [round(bucket.reserve(n, t), 6) for n, t in steps]
    assert got == expected


def test_refund_and_rate_change():
    bucket = TokenBucket(100, 10, now=0.0)
    assert bucket.reserve(110, 0.0) == pytest.approx(1.0)
    bucket.refund(100, 0.0)
    assert bucket.reserve(0, 0.0) == 0.0
    bucket.set_rate(1000, 100, 0.0)
    assert bucket.reserve(1000, 0.0) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("rate", "streams", "expected"),
    [
        (0, 5, 64 * 1024),
        (10 * 1024 * 1024, 1, 64 * 1024),
        (1024 * 1024, 100, int(1024 * 1024 * MAX_GAP / 100)),
        (10_000, 1000, 1024),  # never below the minimum chunk
    ],
)
def test_chunk_size(rate, streams, expected):
    assert chunk_size(rate, streams) == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [([1, 1, 1, 1], 1.0), ([1, 0, 0, 0], 0.25), ([], 1.0), ([2, 1], 0.9)],
)
def test_jain_index(values, expected):
    assert jain_index(values) == pytest.approx(expected)


MON = dt.datetime(2026, 11, 23)  # a Monday


@pytest.mark.parametrize(
    ("window", "when", "inside"),
    [
        (Window.parse("08:00", "18:00"), MON.replace(hour=8), True),
        (Window.parse("08:00", "18:00"), MON.replace(hour=18), False),
        (Window.parse("08:00", "18:00", ["sat"]), MON.replace(hour=9), False),
        (Window.parse("22:00", "06:00"), MON.replace(hour=23), True),
        (Window.parse("22:00", "06:00"), MON.replace(hour=5, minute=59), True),
        (Window.parse("22:00", "06:00"), MON.replace(hour=6), False),
        # Wrapping window on Sundays only: Monday 02:00 belongs to Sunday's window.
        (Window.parse("22:00", "06:00", ["sun"]), MON.replace(hour=2), True),
        (Window.parse("22:00", "06:00", ["sun"]), MON.replace(hour=23), False),
    ],
)
def test_windows(window, when, inside):
    assert window.contains(when) is inside


def test_schedule_falls_back_to_base_rates():
    schedule = RateSchedule(
        Rates(upstream=100, egress=200, per_agent=50),
        (Window.parse("08:00", "18:00", egress=20),),
    )
    assert schedule.rates_at(MON.replace(hour=9)) == Rates(100, 20, 50)
    assert schedule.rates_at(MON.replace(hour=20)) == Rates(100, 200, 50)
    with pytest.raises(ValueError, match="HH:MM"):
        Window.parse("8am", "18:00")


async def _stream(limiter, agent, total, log):
    loop = asyncio.get_running_loop()
    with Pacer(limiter, agent) as pacer:
        sent = 0
        while sent < total:
            n = min(pacer.chunk(), total - sent)
            await pacer.wait(n)
            sent += n
            log.append((loop.time(), agent, n))


async def test_per_agent_limit_holds_and_gaps_stay_short():
    rate = 256 * 1024
    limiter = BandwidthLimiter(0, rate)
    log = []
    task = asyncio.create_task(_stream(limiter, "a", 10**9, log))
    await asyncio.sleep(0.3)  # past the initial burst
    start_bytes = sum(n for _, _, n in log)
    start = asyncio.get_running_loop().time()
    await asyncio.sleep(2.0)
    end = asyncio.get_running_loop().time()
    measured = (sum(n for _, _, n in log) - start_bytes) / (end - start)
    task.cancel()
    assert measured == pytest.approx(rate, rel=0.15)
    times = [t for t, _, _ in log]
    assert max(b - a for a, b in zip(times, times[1:])) < 1.0


async def test_fair_shares_under_a_shared_cap():
    limiter = BandwidthLimiter(2 * 1024 * 1024, 0)
    log = []
    tasks = [asyncio.create_task(_stream(limiter, f"agent-{i}", 10**9, log)) for i in range(20)]
    await asyncio.sleep(2.0)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    per_agent = {}
    for _, agent, n in log:
        per_agent[agent] = per_agent.get(agent, 0) + n
    assert len(per_agent) == 20
    assert jain_index(per_agent.values()) >= 0.95
    # No agent waits more than a second between two writes.
    for i in range(20):
        times = [t for t, a, _ in log if a == f"agent-{i}"]
        assert max(b - a for a, b in zip(times, times[1:])) < 1.0


async def test_cancelled_waiter_refunds_and_does_not_stall_others():
    limiter = BandwidthLimiter(100_000, 0)
    await limiter.acquire("x", 100_000)  # consumes the burst and goes into debt
    waiter = asyncio.create_task(limiter.acquire("x", 100_000))
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await limiter.acquire("y", 1000)
    # Without the refund, "y" would wait behind 100 kB of a vanished reservation (~1 s).
    assert loop.time() - t0 < 0.9


async def test_unlimited_limiter_never_waits_and_rates_can_change():
    limiter = BandwidthLimiter()
    assert not limiter.limited
    await limiter.acquire("a", 10**12)
    assert limiter.throttled_seconds == 0
    limiter.set_rates(1000, 0)
    assert limiter.limited
    await limiter.acquire("a", 2000)
    waits = []
    limiter.on_throttle = waits.append
    await limiter.acquire("a", 100)
    assert waits and waits[0] > 0


async def test_schedule_window_applies_in_a_running_relay(tmp_path, aiohttp_server, serve_origin):
    from relay.publish import Repository
    from tests.support import relay_config, relay_state, start_relay, write_root

    repo = Repository.init(tmp_path / "repo")
    repo.add_bytes(b"x" * 1000, "a.bin", product="a", version="1.0.0")
    origin = await serve_origin(repo)
    cfg_file = tmp_path / "relay.toml"
    # A window that is open all day, every day: its rates replace the (unlimited) base rates.
    cfg_file.write_text(
        '[[limits.schedule]]\nstart = "00:00"\nend = "00:00"\negress = "1MB"\nper_agent = "64KB"\nupstream = "2MB"\n'
    )
    from relay.config import load_config

    base = relay_config(tmp_path, [origin.url], write_root(tmp_path, repo.root_bytes(1)))
    cfg = load_config(
        cfg_file,
        overrides={
            "relay.data_dir": str(base.relay.data_dir),
            "upstream.urls": list(base.upstream.urls),
            "upstream.trusted_root": str(base.upstream.trusted_root),
            "sync.interval": 3600,
        },
    )
    relay = await start_relay(aiohttp_server, cfg)
    state = relay_state(relay)
    assert state.limiter.limited and state.upstream_limiter.limited
    assert state.limiter.chunk("a") == 64_000 * MAX_GAP  # the per-agent window rate decides

"""The asyncio limiter, on virtual time: fairness, pacing, refunds, schedules.

Every scenario but the last runs on :class:`VirtualTimeLoop`, an event loop whose
clock stands still while callbacks run and jumps to the next timer when there is
nothing else to do. The limiter's timers, ``asyncio.sleep`` and ``loop.time()``
all follow it, so the rates, gaps and waits below are exact outcomes of the
arithmetic, the same on an idle machine and on a loaded one. The last test starts
a real relay (on the real clock) and checks only which rates it set.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import selectors
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from relay.config import LimitsSettings, load_config
from relay.core.rates import (
    MAX_GAP,
    MIN_CHUNK,
    SLACK,
    Rates,
    RateSchedule,
    ScheduleEntry,
    burst_for,
    jain_index,
)
from relay.publisher.repository import Repository
from relay.transfer.bandwidth import (
    BandwidthLimiter,
    Pacer,
    follow_schedule,
    schedule_from_config,
)
from tests.support import relay_config, relay_state, start_relay, write_root

KiB = 1024
MiB = 1024 * 1024
MON = dt.datetime(2026, 11, 23)  # a Monday


# -- a virtual-time event loop -------------------------------------------------------


class _JumpingSelector(selectors.DefaultSelector):
    """Polls without blocking; where the loop would sleep until a timer, jumps there."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    def select(self, timeout: float | None = None) -> list[Any]:
        events = super().select(0)
        if not events and timeout is None:
            # Nothing scheduled at all: only another thread can wake the loop (the
            # executor's shutdown does), so wait for it for real.
            events = super().select(None)
        elif not events and timeout > 0:
            self.now += timeout
        return events


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time (see the module docstring)."""

    def __init__(self) -> None:
        self._clock = _JumpingSelector()
        super().__init__(self._clock)

    def time(self) -> float:
        return self._clock.now


def on_virtual_time(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an ``async`` test on a fresh :class:`VirtualTimeLoop`."""

    def run() -> None:
        with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
            runner.run(test())

    run.__name__ = run.__qualname__ = test.__name__
    run.__doc__ = test.__doc__
    return run


@on_virtual_time
async def test_the_virtual_loop_jumps_and_keeps_order():
    loop = asyncio.get_running_loop()
    assert loop.time() == 0.0
    order = []
    loop.call_at(5.0, order.append, "timer")
    await asyncio.sleep(3600)  # an hour, at once
    assert loop.time() == pytest.approx(3600)
    assert order == ["timer"]
    await asyncio.to_thread(order.append, "thread")  # real wake-ups still work
    assert order == ["timer", "thread"]


# -- helpers ----------------------------------------------------------------------------


async def _stream(limiter, agent, log, duration, *, size=None):
    """Stream through a Pacer (or ask for ``size`` bytes at a time) for ``duration`` seconds."""
    loop = asyncio.get_running_loop()
    stop = loop.time() + duration
    with Pacer(limiter, agent) as pacer:
        while loop.time() < stop:
            n = size or pacer.chunk()
            await pacer.wait(n)
            log.append((loop.time(), agent, n))


def _rate(log, start, end, agent=None):
    """Bytes per second granted between the first and the last grant inside [start, end]."""
    grants = [(t, n) for t, a, n in log if start <= t <= end and (agent is None or a == agent)]
    assert len(grants) >= 3, grants
    return sum(n for _, n in grants[1:]) / (grants[-1][0] - grants[0][0])


def _bytes(log, start, end):
    per_agent = {}
    for t, a, n in log:
        if start <= t <= end:
            per_agent[a] = per_agent.get(a, 0) + n
    return per_agent


def _max_gap(log, agent):
    times = [t for t, a, _ in log if a == agent]
    return max(b - a for a, b in zip(times, times[1:], strict=False))


# -- rates, shares and gaps -----------------------------------------------------------


@on_virtual_time
async def test_per_agent_limit_holds_and_gaps_stay_short():
    rate = 256 * KiB
    limiter = BandwidthLimiter(0, rate)
    log = []
    await _stream(limiter, "a", log, 2.3)
    assert _rate(log, 0.3, 2.3) == pytest.approx(rate)
    # One stream alone writes chunks of rate * MAX_GAP: one every MAX_GAP seconds.
    assert _max_gap(log, "a") == pytest.approx(MAX_GAP)
    # The limit, not the writer, set the pace: the stream spent all its time waiting.
    assert limiter.throttled_seconds == pytest.approx(log[-1][0])


class _PlainHandleLoop(VirtualTimeLoop):
    """As uvloop: ``call_at`` answers a plain :class:`asyncio.Handle`, without ``when()``."""

    def call_at(self, when, callback, *args, context=None):  # noqa: ANN001, ANN201
        timer = super().call_at(when, callback, *args, context=context)
        return _PlainHandle(timer, self)


class _PlainHandle(asyncio.Handle):
    def __init__(self, timer: asyncio.TimerHandle, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(lambda: None, (), loop)
        self._timer = timer

    def cancel(self) -> None:
        self._timer.cancel()
        super().cancel()


def test_the_shared_cap_holds_on_a_loop_whose_timers_have_no_when():
    # uvloop's call_at gives a plain Handle for a time already past; the limiter kept
    # asking it when() and failed the request (AttributeError) under load.
    cap = 4 * MiB

    async def run() -> None:
        limiter = BandwidthLimiter(cap, 0)
        log: list[tuple[float, str, int]] = []
        await asyncio.gather(*(_stream(limiter, f"agent-{i}", log, 2.0) for i in range(8)))
        assert _rate(log, 0.4, 2.0) == pytest.approx(cap)

    with asyncio.Runner(loop_factory=_PlainHandleLoop) as runner:
        runner.run(run())


@on_virtual_time
async def test_fair_shares_among_50_agents_under_a_shared_cap():
    cap = 4 * MiB
    limiter = BandwidthLimiter(cap, 0)
    log = []
    agents = [f"agent-{i}" for i in range(50)]
    await asyncio.gather(*(_stream(limiter, a, log, 2.0) for a in agents))
    window = (0.4, 2.0)
    per_agent = _bytes(log, *window)
    assert len(per_agent) == 50
    assert _rate(log, *window) == pytest.approx(cap)
    # Equal shares, up to the chunk a window's two edges cut off.
    chunk = cap * MAX_GAP / 50
    assert max(per_agent.values()) - min(per_agent.values()) <= 2 * chunk
    assert jain_index(per_agent.values()) >= 0.98
    # The first rounds (chunks sized before all 50 arrived) stay under a second;
    # once shares are steady every stream writes every MAX_GAP seconds.
    steady = [e for e in log if e[0] >= 0.6]
    for a in agents:
        assert _max_gap(log, a) < 1.0
        assert _max_gap(steady, a) <= MAX_GAP + SLACK
    assert limiter.queued == 0
    assert limiter.active_streams == 0


@on_virtual_time
async def test_greedy_agents_cannot_take_more_than_a_share():
    # Six ordinary agents with one stream each, "many" with eight streams, and "big"
    # asking for 4 MiB at a time (2 s of the whole cap): eight agents, eight shares.
    cap = 2 * MiB
    limiter = BandwidthLimiter(cap, 0)
    log = []
    big = []
    singles = [f"s{i}" for i in range(6)]

    async def hog():
        loop = asyncio.get_running_loop()
        stop = loop.time() + 1.8
        while loop.time() < stop:
            await limiter.acquire("big", 4 * MiB)
            big.append(loop.time())

    hogging = asyncio.create_task(hog())
    await asyncio.gather(
        *(_stream(limiter, a, log, 1.8) for a in singles),
        *(_stream(limiter, "many", log, 1.8) for _ in range(8)),
    )
    hogging.cancel()
    await asyncio.gather(hogging, return_exceptions=True)
    assert limiter.queued == 0
    per_agent = _bytes(log, 0.3, 1.8)
    share = cap / 8 * 1.5  # bytes each of the eight agents should get in the window
    chunk = cap * MAX_GAP / 8  # a single stream's chunk
    for a in singles:
        assert per_agent[a] == pytest.approx(share, abs=chunk)
        assert _max_gap(log, a) < 1.0
    assert per_agent["many"] == pytest.approx(share, abs=chunk)  # one share, not eight
    assert jain_index(per_agent.values()) >= 0.99
    # 4 MiB at one eighth of 2 MiB/s takes 16 s: it never completed, yet never blocked anyone.
    assert big == []


@on_virtual_time
async def test_per_agent_and_shared_limits_together():
    # Four agents capped at 100 KiB/s each under a 1 MiB/s cap: the agents' own limit
    # decides; then one agent alone under a 64 KiB/s cap: the cap decides.
    limiter = BandwidthLimiter(MiB, 100 * KiB, max_chunk=8 * KiB)
    log = []
    await asyncio.gather(*(_stream(limiter, f"a{i}", log, 1.3) for i in range(4)))
    for i in range(4):
        assert _rate(log, 0.3, 1.3, f"a{i}") == pytest.approx(100 * KiB)
    limiter.set_rates(64 * KiB, 100 * KiB)
    log.clear()
    t1 = asyncio.get_running_loop().time()
    await _stream(limiter, "a0", log, 1.0)
    assert _rate(log, t1 + 0.2, t1 + 1.0) == pytest.approx(64 * KiB)


@on_virtual_time
async def test_rate_change_on_the_fly():
    limiter = BandwidthLimiter(100_000, 0, max_chunk=8 * KiB)
    log = []
    task = asyncio.create_task(_stream(limiter, "a", log, 2.0))
    await asyncio.sleep(1.0)
    limiter.set_rates(400_000, 0)
    await task
    assert _rate(log, 0.2, 1.0) == pytest.approx(100_000)
    assert _rate(log, 1.0, 2.0) == pytest.approx(400_000)  # from the change on


@on_virtual_time
async def test_gaps_stay_short_under_a_slow_cap():
    # 8 KiB/s shared by four agents starting together: 2 KiB/s each, where MIN_CHUNK
    # still keeps a gap of half a second between two grants once all four are in, and
    # the first round, with chunks sized before the others arrived, stays under a second.
    rate = 8 * KiB
    limiter = BandwidthLimiter(rate, 0)
    log = []
    await asyncio.gather(*(_stream(limiter, f"a{i}", log, 1.6) for i in range(4)))
    steady = [e for e in log if e[0] >= 1.0]
    for i in range(4):
        assert _max_gap(log, f"a{i}") < 1.0
        assert _max_gap(steady, f"a{i}") == pytest.approx(4 * MIN_CHUNK / rate)


# -- waiting, lifting, cancelling ---------------------------------------------------------


@on_virtual_time
async def test_lifting_the_limits_releases_waiters_at_once():
    loop = asyncio.get_running_loop()
    limiter = BandwidthLimiter(1000, 1000)
    await limiter.acquire("a", 1000)  # the buckets are nearly empty now
    waiters = [asyncio.create_task(limiter.acquire(a, 1000)) for a in ("a", "b")]
    await asyncio.sleep(0.05)
    assert limiter.queued == 2  # each needs about a second
    lifted_at = loop.time()
    limiter.set_rates(0, 0)
    assert not limiter.limited
    await asyncio.gather(*waiters)
    assert loop.time() == lifted_at  # released without another tick of the clock
    assert [w.result() for w in waiters] == pytest.approx([0.05, 0.05])
    assert limiter.queued == 0


@on_virtual_time
async def test_cancelled_waiters_leave_the_queue_at_once():
    rate = 100_000
    limiter = BandwidthLimiter(rate, 0)  # burst 5000
    await limiter.acquire("x", 5000)  # the bucket is empty now
    hogs = [asyncio.create_task(limiter.acquire("x", 50_000)) for _ in range(5)]
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    last = asyncio.create_task(limiter.acquire("x", 1000))  # queued behind 250 kB (2.5 s)
    await asyncio.sleep(0.01)
    assert limiter.queued == 6
    for t in hogs:
        t.cancel()
    t0 = loop.time()
    await asyncio.gather(*hogs, return_exceptions=True)
    assert all(t.cancelled() for t in hogs)
    await last
    # It waits for its own 1000 bytes at most, not for the vanished 250 kB.
    assert loop.time() - t0 <= 1000 / rate + SLACK
    assert limiter.queued == 0


@on_virtual_time
async def test_cancelled_reservations_are_refunded():
    # Own bucket: a cancelled waiter gives back the tokens it took on entry.
    per_agent = 2048
    limiter = BandwidthLimiter(0, per_agent)  # burst 1024 per agent
    await limiter.acquire("a", 1024)
    hogs = [asyncio.create_task(limiter.acquire("a", 1000)) for _ in range(5)]
    await asyncio.sleep(0.01)
    for t in hogs:
        t.cancel()
    await asyncio.gather(*hogs, return_exceptions=True)
    waited = await limiter.acquire("a", 500)
    assert waited <= 500 / per_agent  # without the refunds: behind 5000 bytes (2.4 s)

    # A request granted in the same instant its owner is cancelled is refunded too,
    # to the shared bucket and to the agent's own.
    loop = asyncio.get_running_loop()
    limiter = BandwidthLimiter(10_000, per_agent)  # bursts of 1024
    await limiter.acquire("b", 1024)  # empties the shared bucket
    waiter = asyncio.create_task(limiter.acquire("a", 1000))
    await asyncio.sleep(0.01)
    own = limiter._agents["a"]
    assert own.tokens(loop.time()) < 500  # "a" took 1000 of its 1024 on entry
    # The limiter grants it on its timer; the owner is cancelled right after, before
    # it runs again (in the same turn of the loop).
    grant_at = limiter._timer.when()
    loop.call_at(grant_at + 1e-10, waiter.cancel)
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert loop.time() == pytest.approx(grant_at)
    assert limiter._shared.tokens(loop.time()) > 900
    assert own.tokens(loop.time()) > 900


@on_virtual_time
async def test_unlimited_costs_nothing_and_waits_are_reported():
    limiter = BandwidthLimiter()
    assert not limiter.limited
    # Returns without suspending: the coroutine finishes on its first step.
    coro = limiter.acquire("a", 10**12)
    with pytest.raises(StopIteration) as stop:
        coro.send(None)
    assert stop.value.value == 0.0
    assert limiter.throttled_seconds == 0

    waits = []
    limiter.set_rates(1000, 0)  # burst 1024
    limiter.on_throttle = waits.append
    coro = limiter.acquire("a", 1000)  # within the burst: granted on the first step
    with pytest.raises(StopIteration):
        coro.send(None)
    assert await limiter.acquire("a", 0) == 0.0
    waited = await limiter.acquire("a", 200)
    assert waited == pytest.approx((200 - (burst_for(1000) - 1000)) / 1000)  # 176 bytes short
    assert waits == [waited]
    assert limiter.throttled_seconds == pytest.approx(waited)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="bad limiter settings"):
        BandwidthLimiter(-1, 0)
    with pytest.raises(ValueError, match="bad limiter settings"):
        BandwidthLimiter(0, 0, max_chunk=0)
    with pytest.raises(ValueError, match="negative"):
        BandwidthLimiter(300, 30).set_rates(-1, 0)


# -- chunks and agents ------------------------------------------------------------------


@on_virtual_time
async def test_chunks_shrink_with_agents_and_streams():
    limiter = BandwidthLimiter(MiB, 0, max_chunk=32 * KiB)
    assert limiter.chunk("a") == 32 * KiB
    pacers = [Pacer(limiter, f"agent-{i}") for i in range(50)]
    for p in pacers:
        p.__enter__()
    assert limiter.active_streams == 50
    assert limiter.chunk("agent-0") == int(MiB * MAX_GAP / 50)
    # An agent with four streams splits its one share four ways.
    extra = [Pacer(limiter, "agent-0") for _ in range(3)]
    for p in extra:
        p.__enter__()
    assert limiter.chunk("agent-0") == int(MiB * MAX_GAP / 200)
    assert pacers[1].chunk() == int(MiB * MAX_GAP / 50)
    for p in pacers + extra:
        p.__exit__(None, None, None)
    assert limiter.active_streams == 0
    limiter.set_rates(MiB, 8 * KiB)
    assert limiter.chunk("a") == int(8 * KiB * MAX_GAP)  # the agent's own rate decides


@on_virtual_time
async def test_the_largest_chunk_is_max_chunk():
    # Fast enough for 64 KiB chunks, but the configured largest write is 4 KiB.
    limiter = BandwidthLimiter(100 * MiB, 10 * MiB, max_chunk=4 * KiB)
    log = []
    await _stream(limiter, "a", log, 0.2)
    assert {n for _, _, n in log} == {4 * KiB}
    assert _rate(log, 0.1, 0.2) == pytest.approx(10 * MiB)  # once the burst is spent


@on_virtual_time
async def test_idle_agent_buckets_are_dropped():
    limiter = BandwidthLimiter(0, 100_000)
    for i in range(20):
        with Pacer(limiter, f"a{i}") as p:
            await p.wait(10)
    limiter.prune()
    assert len(limiter._agents) == 20  # still refilling
    await asyncio.sleep(10 / 100_000)
    limiter.prune()
    assert limiter._agents == {}


# -- schedules --------------------------------------------------------------------------


def test_schedule_from_config():
    limits = LimitsSettings(
        upstream=1000,
        egress=2000,
        per_agent=500,
        schedule=(ScheduleEntry(start="22:00", end="06:00", days=("fri",), egress=200),),
    )
    schedule = schedule_from_config(limits)
    assert schedule.base == Rates(upstream=1000, egress=2000, per_agent=500)
    friday = MON.replace(day=27)
    assert schedule.rates_at(friday.replace(hour=23)) == Rates(1000, 200, 500)
    assert schedule.rates_at(friday.replace(day=28, hour=5)) == Rates(1000, 200, 500)
    assert schedule.rates_at(friday.replace(day=28, hour=6)) == Rates(1000, 2000, 500)
    assert schedule_from_config(LimitsSettings()) == RateSchedule()


@on_virtual_time
async def test_follow_schedule_sets_both_limiters_by_the_time_of_day():
    schedule = RateSchedule.from_entries(
        Rates(upstream=1000, egress=2000, per_agent=500),
        [ScheduleEntry(start="08:00", end="18:00", egress=200, upstream=100)],
    )
    loop = asyncio.get_running_loop()
    start = MON.replace(hour=17, minute=59)

    def now() -> dt.datetime:
        return start + dt.timedelta(seconds=loop.time())

    egress, upstream = BandwidthLimiter(), BandwidthLimiter()
    with Pacer(egress, "a") as pace:
        follower = asyncio.create_task(
            follow_schedule(schedule, egress, upstream, period=30, now=now)
        )
        await asyncio.sleep(0)  # its first look is at once
        assert (egress.rate, egress.per_agent) == (200, 500)  # the window, then the base
        assert (upstream.rate, upstream.per_agent) == (100, 0)
        await pace.wait(100)  # agent "a" has a bucket now
    await asyncio.sleep(59)  # 17:59:59, last look at 17:59:30: still in the window
    assert (egress.rate, upstream.rate) == (200, 100)
    assert egress._agents == {}  # idle buckets go at each look
    await asyncio.sleep(2)  # 18:00:01, looked at 18:00:00
    assert (egress.rate, egress.per_agent) == (2000, 500)
    assert (upstream.rate, upstream.per_agent) == (1000, 0)
    follower.cancel()
    with pytest.raises(asyncio.CancelledError):
        await follower
    with pytest.raises(ValueError, match="period"):
        await follow_schedule(schedule, egress, upstream, period=0)


# -- in a running relay (real clock; no timing asserted) ---------------------------------


async def test_schedule_window_and_chunk_bytes_apply_in_a_running_relay(
    tmp_path, aiohttp_server, serve_origin
):
    repo = Repository.init(tmp_path / "repo")
    repo.add_bytes(b"x" * 1000, "a.bin", product="a", version="1.0.0")
    origin = await serve_origin(repo)
    cfg_file = tmp_path / "relay.toml"
    # A window that is open all day, every day: its rates replace the (unlimited) base
    # rates. Its per-agent rate alone would give chunks of 64 KB * MAX_GAP = 16 KB.
    cfg_file.write_text(
        '[limits]\nchunk_bytes = "8KiB"\n'
        '[[limits.schedule]]\nstart = "00:00"\nend = "00:00"\n'
        'egress = "1MB"\nper_agent = "64KB"\nupstream = "2MB"\n'
    )
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
    assert (state.limiter.rate, state.limiter.per_agent) == (1_000_000, 64_000)
    assert state.upstream_limiter.rate == 2_000_000
    assert "rate-schedule" in state.background.running()
    assert state.limiter.chunk("a") == 8 * KiB  # limits.chunk_bytes caps the paced writes

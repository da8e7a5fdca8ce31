"""Rate arithmetic (pure, table-driven) and the asyncio limiter's behaviour.

The asyncio tests measure bytes granted over windows of about two seconds with
tolerances; they never assert that something is fast.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from relay.config import ScheduleEntry
from relay.server.bandwidth import (
    MAX_GAP,
    MIN_CHUNK,
    BandwidthLimiter,
    FairQueue,
    LimiterRole,
    Pacer,
    Rates,
    RateSchedule,
    TicketState,
    TokenBucket,
    Window,
    chunk_size,
    jain_index,
)

KiB = 1024
MiB = 1024 * 1024

# -- token bucket -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "burst", "steps", "expected"),
    [
        (100, 10, [(10, 0.0)], [0.0]),  # within the burst
        (100, 10, [(10, 0.0), (50, 0.0)], [0.0, 0.5]),  # debt of 50 at 100/s
        (100, 10, [(60, 0.0), (10, 1.0)], [0.5, 0.0]),  # paid back after a second
        (100, 10, [(10, 0.0), (10, 0.0), (10, 0.0)], [0.0, 0.1, 0.2]),  # queue in order
        (0, 0, [(10**9, 0.0)], [0.0]),  # 0 = unlimited
        (100, 10, [(10, 0.0), (10, 100.0)], [0.0, 0.0]),  # idle refill is capped at the burst
        (100, 10, [(10, 0.0), (20, 100.0)], [0.0, 0.1]),  # ... so 100 s idle saves only 10
        (100, 10, [(5, 0.0), (5, 0.02), (5, 0.02)], [0.0, 0.0, 0.03]),  # 2 refilled in 0.02 s
    ],
)
def test_take(rate, burst, steps, expected):
    bucket = TokenBucket(rate, burst, now=0.0)
    assert [round(bucket.take(n, t), 6) for n, t in steps] == expected


@pytest.mark.parametrize(
    ("taken", "n", "now", "expected"),
    [
        (0, 10, 0.0, 0.0),  # full bucket
        (10, 10, 0.0, 0.1),  # empty: 10 tokens at 100/s
        (10, 5, 0.02, 0.03),  # 2 refilled, 3 missing
        (30, 10, 0.0, 0.3),  # 20 in debt, then 10
        (0, 1000, 0.0, 0.0),  # larger than the burst: ready when full
        (10, 1000, 0.0, 0.1),  # ... i.e. after 10 tokens, not 1000
    ],
)
def test_ready_in(taken, n, now, expected):
    bucket = TokenBucket(100, 10, now=0.0)
    bucket.take(taken, 0.0)
    assert bucket.ready_in(n, now) == pytest.approx(expected)
    assert bucket.ready_in(n, now) == pytest.approx(expected)  # reserves nothing


def test_refund_and_rate_change():
    bucket = TokenBucket(100, 10, now=0.0)
    assert bucket.take(110, 0.0) == pytest.approx(1.0)
    bucket.refund(100, 0.0)
    assert bucket.tokens(0.0) == pytest.approx(0.0)
    bucket.refund(1000, 0.0)
    assert bucket.tokens(0.0) == pytest.approx(10)  # never above the burst
    bucket.take(110, 0.0)  # 100 in debt
    bucket.set_rate(1000, 0.0)  # the debt stays, paid 10x faster
    assert bucket.ready_in(0, 0.0) == pytest.approx(0.1)
    bucket.set_rate(1000, 0.0, burst=500)
    assert bucket.burst == 500
    bucket.set_rate(0, 0.0)  # unlimited forgets the debt
    assert bucket.take(10**9, 0.0) == 0.0
    bucket.set_rate(100, 1.0, burst=50)  # limited again: starts full
    assert bucket.tokens(1.0) == pytest.approx(50)
    assert bucket.idle(1.0)
    bucket.take(1, 1.0)
    assert not bucket.idle(1.0)
    assert bucket.idle(1.01)
    with pytest.raises(ValueError, match=">= 0"):
        bucket.set_rate(-1, 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        TokenBucket(-1, 10)


def test_bucket_clock_starts_at_first_use():
    bucket = TokenBucket(100, 10)  # no time yet
    assert bucket.take(20, 1000.0) == pytest.approx(0.1)  # no refill for 1000 s "before"
    assert bucket.tokens(1000.1) == pytest.approx(0.0, abs=1e-6)


# -- chunk size and fairness index --------------------------------------------------


@pytest.mark.parametrize(
    ("rate", "streams", "max_chunk", "expected"),
    [
        (0, 5, 64 * KiB, 64 * KiB),  # unlimited: the largest chunk
        (10 * MiB, 1, 64 * KiB, 64 * KiB),  # fast: capped
        (MiB, 100, 64 * KiB, int(MiB * MAX_GAP / 100)),  # a round of 100 chunks lasts MAX_GAP
        (20 * MiB, 50, 64 * KiB, 64 * KiB),  # the benchmark's case: 50 x 64 KiB = 0.16 s
        (10_000, 1000, 64 * KiB, MIN_CHUNK),  # never below the minimum chunk
        (256 * KiB, 1, 16 * KiB, 16 * KiB),  # a configured smaller maximum
        (256 * KiB, 0, 64 * KiB, 64 * KiB),  # 0 streams count as 1
        (100, 1, 512, 512),  # a maximum below MIN_CHUNK wins
    ],
)
def test_chunk_size(rate, streams, max_chunk, expected):
    size = chunk_size(rate, streams, max_chunk)
    assert size == expected
    if rate and size > MIN_CHUNK and size < max_chunk:
        assert streams * size / rate <= MAX_GAP  # the round, hence each stream's gap


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1, 1, 1, 1], 1.0),
        ([1, 0, 0, 0], 0.25),
        ([], 1.0),
        ([0, 0], 1.0),
        ([2, 1], 0.9),
        ([5.0] * 49 + [0.0], 0.98),
    ],
)
def test_jain_index(values, expected):
    assert jain_index(values) == pytest.approx(expected)


# -- fair queue (pure) ----------------------------------------------------------------


def _drain(queue, bucket, now):
    return [t.item for t in queue.grant(now, bucket)]


@pytest.mark.parametrize(
    ("pushes", "expected"),
    [
        # Equal sizes: flows take turns however many requests each has queued.
        ([("a", 1), ("a", 1), ("a", 1), ("b", 1)], ["a0", "b3", "a1", "a2"]),
        # Unequal sizes: equal bytes, not equal requests (b's 4 bytes after a's 4).
        ([("a", 1), ("a", 1), ("a", 1), ("a", 1), ("b", 4)], ["a0", "a1", "a2", "a3", "b4"]),
        ([("b", 4), ("a", 1), ("a", 1), ("a", 1), ("a", 1)], ["a1", "a2", "a3", "b0", "a4"]),
        # Three flows, round-robin.
        (
            [("a", 2), ("a", 2), ("b", 2), ("b", 2), ("c", 2)],
            ["a0", "b2", "c4", "a1", "b3"],
        ),
    ],
)
def test_fair_queue_order(pushes, expected):
    queue = FairQueue()
    for i, (flow, size) in enumerate(pushes):
        queue.push(flow, size, f"{flow}{i}", eligible_at=0.0)
    assert len(queue) == len(pushes)
    assert _drain(queue, TokenBucket(0, 0), 0.0) == expected
    assert len(queue) == 0
    assert queue.next_wakeup(0.0, TokenBucket(0, 0)) is None


def test_fair_queue_paced_by_the_bucket():
    queue = FairQueue()
    bucket = TokenBucket(1000, 1000, now=0.0)
    for i in range(4):
        queue.push("ab"[i % 2], 500, i, eligible_at=0.0)
    assert _drain(queue, bucket, 0.0) == [0, 1]  # the burst pays for two
    assert queue.next_wakeup(0.0, bucket) == pytest.approx(0.5)
    assert _drain(queue, bucket, 0.25) == []
    assert _drain(queue, bucket, 0.5) == [2]
    assert _drain(queue, bucket, 1.0) == [3]


def test_fair_queue_large_request_goes_into_debt():
    queue = FairQueue()
    bucket = TokenBucket(1000, 100, now=0.0)
    queue.push("a", 5000, "big", eligible_at=0.0)
    assert _drain(queue, bucket, 0.0) == ["big"]  # a full bucket pays for any size
    queue.push("b", 100, "small", eligible_at=0.0)
    assert _drain(queue, bucket, 0.0) == []
    assert queue.next_wakeup(0.0, bucket) == pytest.approx(5.0)  # 4900 of debt + 100
    assert _drain(queue, bucket, 5.0) == ["small"]


def test_fair_queue_eligibility_and_cancel():
    queue = FairQueue()
    bucket = TokenBucket(0, 0)
    late = queue.push("a", 10, "late", eligible_at=1.0)
    queue.push("b", 10, "now", eligible_at=0.0)
    gone = queue.push("c", 10, "gone", eligible_at=0.0)
    assert queue.cancel(gone)
    assert not queue.cancel(gone)
    assert gone.state is TicketState.CANCELLED
    assert queue.pending("c") == 0
    assert _drain(queue, bucket, 0.0) == ["now"]
    assert queue.next_wakeup(0.0, bucket) == 1.0
    assert _drain(queue, bucket, 0.5) == []
    assert _drain(queue, bucket, 1.0) == ["late"]
    assert late.state is TicketState.GRANTED
    assert not queue.cancel(late)
    # A late ticket keeps its tag: once eligible it goes before later arrivals.
    queue.push("a", 10, "a-late", eligible_at=5.0)
    queue.push("b", 10, "b1", eligible_at=0.0)
    queue.push("b", 10, "b2", eligible_at=0.0)
    assert _drain(queue, TokenBucket(10, 10, now=0.0), 0.0) == ["b1"]
    assert _drain(queue, TokenBucket(10, 10, now=5.0), 5.0) == ["a-late"]
    queue.expedite()  # nothing left to expedite but b2, already eligible
    with pytest.raises(ValueError, match="at least one byte"):
        queue.push("a", 0, "x", eligible_at=0.0)


def test_fair_queue_expedite():
    queue = FairQueue()
    queue.push("a", 10, "a", eligible_at=100.0)
    queue.push("b", 10, "b", eligible_at=50.0)
    queue.expedite()
    assert queue.next_wakeup(0.0, TokenBucket(0, 0)) == 0.0
    assert sorted(_drain(queue, TokenBucket(0, 0), 0.0)) == ["a", "b"]


def test_fair_queue_newcomer_banks_no_credit():
    # "a" was served bytes 1..4; a newcomer starts at the virtual time, so it
    # interleaves with a's remaining requests instead of jumping ahead of all of them.
    queue = FairQueue()
    bucket = TokenBucket(1, 4, now=0.0)
    for i in range(6):
        queue.push("a", 1, f"a{i}", eligible_at=0.0)
    assert _drain(queue, bucket, 0.0) == ["a0", "a1", "a2", "a3"]
    queue.push("c", 1, "c0", eligible_at=0.0)
    queue.push("c", 1, "c1", eligible_at=0.0)
    assert _drain(queue, TokenBucket(0, 0), 0.0) == ["a4", "c0", "a5", "c1"]


def test_fair_queue_quantum_caps_a_stale_large_request():
    # "a" asked for 4096 bytes while it was alone; three more flows arrive and the
    # quantum drops to 1024. Charged in full, "a" would wait for 3 x 4096 bytes of the
    # others; charged one quantum, it is served in the first round.
    queue = FairQueue(quantum=4096)
    bucket = TokenBucket(0, 0)
    queue.push("a", 4096, "a", eligible_at=0.0)
    queue.set_quantum(1024)
    assert queue.quantum == 1024
    for flow in "bcd":
        for i in range(4):
            queue.push(flow, 1024, f"{flow}{i}", eligible_at=0.0)
    order = _drain(queue, bucket, 0.0)
    assert order.index("a") <= 3
    assert order[:4] == ["a", "b0", "c0", "d0"]
    # Without the smaller quantum, "a" comes after 3072 bytes of each of the others.
    queue = FairQueue()
    queue.push("a", 4096, "a", eligible_at=0.0)
    for flow in "bcd":
        for i in range(4):
            queue.push(flow, 1024, f"{flow}{i}", eligible_at=0.0)
    assert _drain(queue, bucket, 0.0).index("a") == 9
    with pytest.raises(ValueError, match="positive"):
        queue.set_quantum(0)


def test_fair_queue_charges_at_most_one_quantum():
    queue = FairQueue(quantum=1000)
    queue.push("a", 5000, "a", eligible_at=0.0)  # tagged 1000, not 5000
    queue.push("b", 1000, "b", eligible_at=0.0)
    assert _drain(queue, TokenBucket(0, 0), 0.0) == ["a", "b"]


def test_fair_queue_retag_keeps_each_flow_in_order():
    queue = FairQueue(quantum=1000)
    for i in range(3):
        queue.push("a", 1000, f"a{i}", eligible_at=0.0)
    queue.push("b", 300, "b0", eligible_at=5.0)  # waiting for its own limit
    queue.set_quantum(900)  # not a quarter smaller: tags stay
    queue.set_quantum(500)  # re-tags: a0 500, a1 1000, a2 1500; b0 300
    queue.push("c", 500, "c0", eligible_at=0.0)  # 500, after a0 (same tag, later)
    assert queue.flows == 3
    assert _drain(queue, TokenBucket(0, 0), 0.0) == ["a0", "c0", "a1", "a2"]
    assert _drain(queue, TokenBucket(0, 0), 5.0) == ["b0"]


# -- schedules ------------------------------------------------------------------------

MON = dt.datetime(2026, 11, 23)  # a Monday


@pytest.mark.parametrize(
    ("window", "when", "inside"),
    [
        (Window.parse("08:00", "18:00"), MON.replace(hour=8), True),
        (Window.parse("08:00", "18:00"), MON.replace(hour=7, minute=59), False),
        (Window.parse("08:00", "18:00"), MON.replace(hour=18), False),
        (Window.parse("08:00", "18:00", ["mon"]), MON.replace(hour=9), True),
        (Window.parse("08:00", "18:00", ["sat", "sun"]), MON.replace(hour=9), False),
        (Window.parse("08:00", "18:00", ["SAT"]), MON.replace(day=28, hour=9), True),
        (Window.parse("22:00", "06:00"), MON.replace(hour=23), True),
        (Window.parse("22:00", "06:00"), MON.replace(hour=5, minute=59), True),
        (Window.parse("22:00", "06:00"), MON.replace(hour=6), False),
        (Window.parse("22:00", "06:00"), MON.replace(hour=21, minute=59), False),
        # Wrapping window on Sundays only: Monday 02:00 belongs to Sunday's window...
        (Window.parse("22:00", "06:00", ["sun"]), MON.replace(hour=2), True),
        # ... and Monday 23:00 to Monday's, which is not on.
        (Window.parse("22:00", "06:00", ["sun"]), MON.replace(hour=23), False),
        (Window.parse("22:00", "06:00", ["sun"]), MON.replace(day=22, hour=2), False),
        # Equal start and end: 24 hours from the start.
        (Window.parse("00:00", "00:00"), MON.replace(hour=13), True),
        (Window.parse("09:30", "09:30", ["tue"]), MON.replace(day=24, hour=9), False),
        (Window.parse("09:30", "09:30", ["tue"]), MON.replace(day=24, hour=10), True),
        (Window.parse("09:30", "09:30", ["tue"]), MON.replace(day=25, hour=9), True),
        # Time zones: the wall-clock time the datetime carries decides.
        (
            Window.parse("08:00", "18:00"),
            dt.datetime(2026, 11, 23, 9, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
            True,
        ),
    ],
)
def test_windows(window, when, inside):
    assert window.contains(when) is inside


@pytest.mark.parametrize(
    ("start", "end", "days", "match"),
    [
        ("8am", "18:00", (), "HH:MM"),
        ("24:00", "18:00", (), "HH:MM"),
        ("08:60", "18:00", (), "HH:MM"),
        ("08:0", "18:00", (), "HH:MM"),
        ("08:00", "18:00", ("monday",), "unknown day"),
    ],
)
def test_window_parse_errors(start, end, days, match):
    with pytest.raises(ValueError, match=match):
        Window.parse(start, end, days)


def test_schedule_falls_back_to_base_rates_and_first_window_wins():
    schedule = RateSchedule.from_entries(
        Rates(upstream=100, egress=200, per_agent=50),
        [
            ScheduleEntry(start="08:00", end="18:00", days=("mon", "tue"), egress=20),
            ScheduleEntry(start="12:00", end="14:00", egress=10, upstream=5, per_agent=1),
            ScheduleEntry(start="22:00", end="06:00", upstream=0),
        ],
    )
    assert schedule.rates_at(MON.replace(hour=9)) == Rates(100, 20, 50)
    assert schedule.rates_at(MON.replace(hour=13)) == Rates(100, 20, 50)  # first window wins
    assert schedule.rates_at(MON.replace(day=25, hour=13)) == Rates(5, 10, 1)  # a Wednesday
    assert schedule.rates_at(MON.replace(hour=20)) == Rates(100, 200, 50)  # base
    assert schedule.rates_at(MON.replace(hour=23)) == Rates(0, 200, 50)  # 0 = unlimited
    assert RateSchedule().rates_at(MON) == Rates(0, 0, 0)
    with pytest.raises(ValueError, match="negative"):
        Window.parse("08:00", "09:00", egress=-1)


# -- the asyncio limiter ------------------------------------------------------------


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
    """Bytes per second granted between two grants inside [start, end] (pacing is exact)."""
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
    return max(b - a for a, b in zip(times, times[1:]))


async def test_per_agent_limit_holds_and_gaps_stay_short():
    rate = 256 * KiB
    limiter = BandwidthLimiter(0, rate)
    log = []
    t0 = asyncio.get_running_loop().time()
    await _stream(limiter, "a", log, 2.3)
    assert _rate(log, t0 + 0.3, t0 + 2.3) == pytest.approx(rate, rel=0.15)
    assert _max_gap(log, "a") < 1.0
    assert limiter.throttled_seconds > 1.0  # it was held back for most of the time


async def test_fair_shares_among_50_agents_under_a_shared_cap():
    cap = 4 * MiB
    limiter = BandwidthLimiter(cap, 0)
    log = []
    agents = [f"agent-{i}" for i in range(50)]
    t0 = asyncio.get_running_loop().time()
    await asyncio.gather(*(_stream(limiter, a, log, 2.0) for a in agents))
    window = (t0 + 0.4, t0 + 2.0)
    per_agent = _bytes(log, *window)
    assert len(per_agent) == 50
    assert jain_index(per_agent.values()) >= 0.95
    assert _rate(log, *window) == pytest.approx(cap, rel=0.05)
    for a in agents:
        assert _max_gap(log, a) < 1.0
    assert limiter.queued == 0
    assert limiter.active_streams == 0


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

    t0 = asyncio.get_running_loop().time()
    hogging = asyncio.create_task(hog())
    await asyncio.gather(
        *(_stream(limiter, a, log, 1.8) for a in singles),
        *(_stream(limiter, "many", log, 1.8) for _ in range(8)),
    )
    hogging.cancel()
    await asyncio.gather(hogging, return_exceptions=True)
    assert limiter.queued == 0
    per_agent = _bytes(log, t0 + 0.3, t0 + 1.8)
    share = cap / 8 * 1.5  # bytes each of the eight agents should get in the window
    assert jain_index(per_agent.values()) >= 0.95
    for a in singles:
        assert per_agent[a] == pytest.approx(share, rel=0.2)
        assert _max_gap(log, a) < 1.0
    assert per_agent["many"] == pytest.approx(share, rel=0.2)  # one share, not eight
    # 4 MiB at one eighth of 2 MiB/s takes 16 s: it never completed, yet never blocked anyone.
    assert big == []


async def test_per_agent_and_shared_limits_together():
    # Four agents capped at 100 KiB/s each under a 1 MiB/s cap: the agents' own limit
    # decides; then one agent alone under a 64 KiB/s cap: the cap decides.
    limiter = BandwidthLimiter(MiB, 100 * KiB, max_chunk=8 * KiB)
    log = []
    t0 = asyncio.get_running_loop().time()
    await asyncio.gather(*(_stream(limiter, f"a{i}", log, 1.3) for i in range(4)))
    for i in range(4):
        assert _rate(log, t0 + 0.3, t0 + 1.3, f"a{i}") == pytest.approx(100 * KiB, rel=0.15)
    limiter.set_rates(64 * KiB, 100 * KiB)
    log.clear()
    t1 = asyncio.get_running_loop().time()
    await _stream(limiter, "a0", log, 1.0)
    assert _rate(log, t1 + 0.2, t1 + 1.0) == pytest.approx(64 * KiB, rel=0.15)


async def test_rate_change_on_the_fly():
    limiter = BandwidthLimiter(100_000, 0, max_chunk=8 * KiB)
    log = []
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    task = asyncio.create_task(_stream(limiter, "a", log, 2.0))
    await asyncio.sleep(1.0)
    limiter.set_rates(400_000, 0)
    t1 = loop.time()
    await task
    assert _rate(log, t0 + 0.2, t1) == pytest.approx(100_000, rel=0.15)
    assert _rate(log, t1 + 0.2, t0 + 2.0) == pytest.approx(400_000, rel=0.15)


async def test_lifting_the_limits_releases_waiters_at_once():
    limiter = BandwidthLimiter(1000, 1000)
    await limiter.acquire("a", 1000)  # the bucket is empty now
    waiters = [asyncio.create_task(limiter.acquire(a, 1000)) for a in ("a", "b")]
    await asyncio.sleep(0.05)
    assert limiter.queued == 2  # each needs about a second
    limiter.set_rates(0, 0)
    assert not limiter.limited
    done, pending = await asyncio.wait(waiters, timeout=0.5)
    assert pending == set()
    assert all(t.result() > 0 for t in done)
    assert limiter.queued == 0


async def test_cancelled_waiters_leave_the_queue_at_once():
    limiter = BandwidthLimiter(100_000, 0)  # burst 5000
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
    await asyncio.wait_for(last, timeout=2.0)
    # Without withdrawal "last" would wait for the vanished 250 kB (about 2.5 s).
    assert loop.time() - t0 < 1.0
    assert limiter.queued == 0


async def test_cancelled_reservations_are_refunded():
    # Own bucket: a cancelled waiter gives back the tokens it took on entry.
    limiter = BandwidthLimiter(0, 2048)  # burst 1024 per agent
    await limiter.acquire("a", 1024)
    hogs = [asyncio.create_task(limiter.acquire("a", 1000)) for _ in range(5)]
    await asyncio.sleep(0.01)
    for t in hogs:
        t.cancel()
    await asyncio.gather(*hogs, return_exceptions=True)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await limiter.acquire("a", 500)  # without the refunds: behind 5000 bytes at 2 kB/s
    assert loop.time() - t0 < 1.0

    # A request granted in the same instant its owner is cancelled is refunded too.
    limiter = BandwidthLimiter(10_000, 2048)
    await limiter.acquire("b", 1024)  # empties the shared bucket
    before = limiter._agents  # buckets by agent
    waiter = asyncio.create_task(limiter.acquire("a", 1000))
    await asyncio.sleep(0.01)
    assert before["a"].tokens(loop.time()) < 500  # "a" took 1000 of its 1024 on entry
    limiter.set_rates(0, 2048)  # the shared bucket lets it through...
    waiter.cancel()  # ... but its owner is gone before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert before["a"].tokens(loop.time()) > 900


async def test_gaps_stay_short_under_a_slow_cap():
    # 8 KiB/s shared by four agents starting together: 2 KiB/s each, where MIN_CHUNK
    # still keeps a gap of half a second between two grants once all four are in, and
    # the first round, with chunks sized before the others arrived, stays under a second.
    limiter = BandwidthLimiter(8 * KiB, 0)
    log = []
    await asyncio.gather(*(_stream(limiter, f"a{i}", log, 1.6) for i in range(4)))
    for i in range(4):
        assert _max_gap(log, f"a{i}") < 1.0


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
    waited = await limiter.acquire("a", 200)  # 176 bytes short at 1000/s
    assert 0.1 < waited < 1.0
    assert waits == [waited]
    assert limiter.throttled_seconds == pytest.approx(waited)


def test_schedule_is_applied_by_the_limiter():
    schedule = RateSchedule.from_entries(
        Rates(upstream=1000, egress=2000, per_agent=500),
        [ScheduleEntry(start="08:00", end="18:00", egress=200, upstream=100)],
    )
    egress = BandwidthLimiter.from_schedule(schedule, LimiterRole.EGRESS, MON.replace(hour=9))
    upstream = BandwidthLimiter.from_schedule(schedule, LimiterRole.UPSTREAM, MON.replace(hour=9))
    assert (egress.rate, egress.per_agent) == (200, 500)
    assert (upstream.rate, upstream.per_agent) == (100, 0)
    assert egress.apply_schedule(MON.replace(hour=19)) == Rates(1000, 2000, 500)
    assert (egress.rate, egress.per_agent) == (2000, 500)
    upstream.apply_schedule(MON.replace(hour=19))
    assert upstream.rate == 1000
    # Without a schedule the constructor's rates are the base.
    plain = BandwidthLimiter(300, 30)
    plain.set_rates(1, 1)
    plain.apply_schedule(MON)
    assert (plain.rate, plain.per_agent) == (300, 30)
    with pytest.raises(ValueError, match="negative"):
        plain.set_rates(-1, 0)


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
    assert limiter.chunk("agent-1") == int(MiB * MAX_GAP / 50)
    for p in pacers + extra:
        p.__exit__(None, None, None)
    assert limiter.active_streams == 0
    limiter.set_rates(MiB, 8 * KiB)
    assert limiter.chunk("a") == int(8 * KiB * MAX_GAP)  # the agent's own rate decides


async def test_idle_agent_buckets_are_dropped():
    limiter = BandwidthLimiter(0, 100_000)
    for i in range(20):
        with Pacer(limiter, f"a{i}") as p:
            await p.wait(10)
    await asyncio.sleep(0.01)  # 10 bytes refill in 0.1 ms
    limiter.apply_schedule(MON)
    assert limiter._agents == {}


async def test_schedule_window_applies_in_a_running_relay(tmp_path, aiohttp_server, serve_origin):
    from relay.publisher.repository import Repository
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

"""Rate arithmetic, table-driven: token buckets, chunk sizes, fair queueing, schedules.

Everything here is pure: times are explicit values, nothing sleeps.
"""

from __future__ import annotations

import datetime as dt

import pytest

from relay.core.rates import (
    MAX_GAP,
    MIN_CHUNK,
    FairQueue,
    Rates,
    RateSchedule,
    ScheduleEntry,
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
        ("\u00b9\u00b2:00", "18:00", (), "HH:MM"),  # digits, but not ASCII ones
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

"""One egress cap over several processes: the arithmetic, the shared records, the limiter.

The arithmetic (:func:`relay.core.rates.egress_shares`) is tested with Hypothesis;
the records of :class:`relay.transfer.share.EgressShare` with several instances over
one file in this process and a clock the test moves; the limiter's share on the
virtual-time loop of ``test_bandwidth``. Two real processes sharing a cap:
``test_share_processes.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.rates import IDLE_SHARE, egress_shares
from relay.transfer.bandwidth import BandwidthLimiter, Pacer
from relay.transfer.share import RECORD_SIZE, STALE_AFTER, EgressShare
from tests.test_bandwidth import MiB, VirtualTimeLoop, _rate, _stream, on_virtual_time

slots = st.lists(st.none() | st.integers(min_value=-3, max_value=10_000), min_size=1, max_size=64)


# -- the arithmetic ---------------------------------------------------------------------


@given(slots)
def test_shares_sum_to_the_cap_and_are_never_negative(flows):
    shares = egress_shares(flows)
    assert len(shares) == len(flows)
    assert all(0 <= s <= 1 for s in shares)
    if any(f is not None for f in flows):
        assert math.fsum(shares) == pytest.approx(1.0)
    else:
        assert shares == tuple(0.0 for _ in flows)


@given(slots)
def test_stale_slots_get_nothing_and_live_ones_something(flows):
    for f, share in zip(flows, egress_shares(flows), strict=True):
        assert (share == 0) is (f is None)


@given(slots)
def test_every_flow_of_the_relay_gets_the_same_part(flows):
    shares = egress_shares(flows)
    busy = [(f, s) for f, s in zip(flows, shares, strict=True) if f is not None and f > 0]
    per_flow = {round(s / f, 12) for f, s in busy}
    assert len(per_flow) <= 1
    if busy:
        # The idle slots' floor costs the busy ones at most IDLE_SHARE of the cap.
        assert math.fsum(s for _, s in busy) >= 1 - IDLE_SHARE - 1e-12


@given(slots)
def test_idle_slots_get_a_floor(flows):
    live = [f for f in flows if f is not None]
    for f, share in zip(flows, egress_shares(flows), strict=True):
        if f is not None and f <= 0:
            if any(g > 0 for g in live):
                assert share == pytest.approx(IDLE_SHARE / len(live))
            else:
                assert share == pytest.approx(1 / len(live))


@pytest.mark.parametrize(
    ("flows", "expected"),
    [
        ([3, 1], (0.75, 0.25)),
        ([1, None], (1.0, 0.0)),
        ([0, 0, None], (0.5, 0.5, 0.0)),
        ([4, 0], (1 - IDLE_SHARE / 2, IDLE_SHARE / 2)),
        ([None, None], (0.0, 0.0)),
    ],
)
def test_shares_table(flows, expected):
    assert egress_shares(flows) == pytest.approx(expected)


def test_a_bad_idle_share_is_refused():
    with pytest.raises(ValueError, match="idle share"):
        egress_shares([1], idle_share=1.0)


# -- the shared records ------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_records_are_shared_and_stale_ones_ignored(tmp_path):
    path = tmp_path / "egress.shm"
    clock = Clock()
    with (
        EgressShare(path, 0, 3, clock=clock) as a,
        EgressShare(path, 1, 3, clock=clock) as b,
    ):
        assert path.stat().st_size == 3 * RECORD_SIZE
        assert a.flows() == [None, None, None]  # nothing published yet
        a.publish(3)
        b.publish(1)
        assert a.flows() == b.flows() == [3, 1, None]
        clock.now += STALE_AFTER / 2
        b.publish(2)
        assert a.flows() == [3, 2, None]
        clock.now += STALE_AFTER  # a's heartbeat is old now: a dead or stuck process
        assert b.flows() == [None, 2, None]
        b.clear()  # a process that stops
        assert a.flows() == [None, None, None]


def test_a_heartbeat_ahead_of_the_clock_is_stale(tmp_path):
    # A record left by a previous boot, whose monotonic clock ran further.
    path = tmp_path / "egress.shm"
    clock = Clock()
    with EgressShare(path, 0, 2, clock=clock) as a, EgressShare(path, 1, 2, clock=clock) as b:
        a.publish(5)
        clock.now -= 10 * STALE_AFTER
        assert b.flows() == [None, None]


def test_a_file_from_an_earlier_run_is_reused_and_grown(tmp_path):
    path = tmp_path / "egress.shm"
    clock = Clock()
    with EgressShare(path, 1, 2, clock=clock) as old:
        old.publish(7)
    with EgressShare(path, 2, 4, clock=clock) as new:
        assert path.stat().st_size == 4 * RECORD_SIZE
        assert new.flows() == [None, None, None, None]  # the old process cleared its slot
        new.publish(1)
        assert new.flows() == [None, None, 1, None]


def test_a_torn_record_is_read_again(tmp_path):
    path = tmp_path / "egress.shm"
    clock = Clock()
    with EgressShare(path, 0, 2, clock=clock) as a, EgressShare(path, 1, 2, clock=clock) as b:
        a.publish(4)
        raw = bytearray(path.read_bytes())
        # A writer caught between its two stores leaves the sequence word odd.
        with path.open("r+b") as f:
            f.write((int.from_bytes(raw[:8], "little") + 1).to_bytes(8, "little"))
        assert b.flows() == [None, None]  # not trusted while odd
        a.publish(4)  # the writer goes on from where the file stands
        assert b.flows() == [4, None]


def test_bad_slots_are_refused(tmp_path):
    for slot, slots_ in ((2, 2), (-1, 2)):
        with pytest.raises(ValueError, match="outside"):
            EgressShare(tmp_path / "egress.shm", slot, slots_)


# -- the limiter's share -----------------------------------------------------------------


@on_virtual_time
async def test_a_share_paces_the_limiter_at_its_part_of_the_rate():
    cap = 4 * MiB
    limiter = BandwidthLimiter(cap, 0)
    limiter.set_share(0.25)
    log = []
    await _stream(limiter, "a", log, 2.0)
    assert _rate(log, 0.3, 2.0) == pytest.approx(cap / 4, rel=0.02)
    assert limiter.rate == cap  # the relay's cap, as set
    # A schedule or a reload changes the rate; the share stays.
    limiter.set_rates(2 * MiB, 64 * 1024)
    assert (limiter.rate, limiter.per_agent, limiter.share) == (2 * MiB, 64 * 1024, 0.25)
    with pytest.raises(ValueError, match="share"):
        limiter.set_share(0)


@on_virtual_time
async def test_active_flows_count_agents_not_streams():
    limiter = BandwidthLimiter(MiB, 0)
    with Pacer(limiter, "a"), Pacer(limiter, "a"), Pacer(limiter, "b"):
        assert limiter.active_flows == 2
    assert limiter.active_flows == 0


def test_two_limiters_over_one_file_split_the_cap_by_their_agents(tmp_path):
    # Two processes' limiters (here in one loop), one with three agents and one with
    # one: every agent gets a quarter of the cap.
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        runner.run(_split_the_cap(tmp_path / "egress.shm"))


async def _split_the_cap(path):
    cap = 4 * MiB
    limiters = [BandwidthLimiter(cap, 0), BandwidthLimiter(cap, 0)]
    loop = asyncio.get_running_loop()
    shares = [EgressShare(path, i, 2, clock=loop.time) for i in range(2)]
    keepers = [asyncio.create_task(s.run(lim)) for s, lim in zip(shares, limiters, strict=True)]
    log0: list = []
    log1: list = []
    await asyncio.gather(
        _stream(limiters[0], "solo", log0, 3.0),
        *(_stream(limiters[1], f"agent-{i}", log1, 3.0) for i in range(3)),
    )
    for keeper in keepers:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
    for share in shares:
        share.close()
    solo = _rate(log0, 0.5, 3.0)
    others = [_rate(log1, 0.5, 3.0, f"agent-{i}") for i in range(3)]
    assert solo + sum(others) == pytest.approx(cap, rel=0.05)
    for rate in (solo, *others):
        assert rate == pytest.approx(cap / 4, rel=0.1)
    assert limiters[0].share == limiters[1].share == 1.0  # given back on the way out

"""Bandwidth limits, the asyncio side: waiting for bytes, pacing streams, schedules.

Rules:

* The arithmetic lives in :mod:`relay.core.rates` (token buckets, the fair queue,
  chunk sizes, time-of-day schedules); this module only waits for it. Rates are
  bytes per second and 0 always means unlimited.
* Fairness is per agent, not per connection: every agent (the ``Relay-Agent-Id``,
  else the client address) is one flow of the fair queue, so agents competing for
  the shared egress bucket get equal bytes however many connections they open or
  however large the requests they make. Requests larger than one chunk are granted
  piece by piece, so no single grant holds the shared bucket for longer than
  :data:`~relay.core.rates.MAX_GAP`.
* A per-agent limit delays when an agent's request becomes *eligible* in the fair
  queue; it never holds the shared bucket, so an agent that waits for its own
  bucket does not waste the others' bandwidth, and the two waits overlap.
* Writes are paced in chunks of at most ``limits.chunk_bytes`` that shrink as
  streams multiply (:func:`~relay.core.rates.chunk_size`). A request is charged at
  most one such chunk in virtual time, so a chunk sized before other agents
  arrived does not hold its stream back for a whole round of theirs.
* :class:`BandwidthLimiter` reads ``loop.time()`` inside coroutines and callbacks,
  takes no loop at construction, and needs no background task (the queue is pumped
  from ``acquire`` and from one timer handle). A cancelled waiter leaves the queue
  at once and its tokens are refunded, so nobody queued behind it waits for bytes
  that will never be sent. An unlimited limiter returns from ``acquire`` without
  awaiting anything.
* Several processes serving one relay each take a *share* of the shared rate
  (:meth:`BandwidthLimiter.set_share`, kept by :mod:`relay.transfer.share`): the
  rate a schedule or a reload sets stays the relay's, and the process paces at
  that rate times its share. The per-agent rate is not shared: it holds per process.
* Time-of-day rates are followed by one task, :func:`follow_schedule`, which reads
  the wall clock through a function it is given. It follows a :class:`LiveSchedule`
  when the schedule may be replaced while it runs (a configuration reload).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, Self

from relay.config import LimitsSettings
from relay.core.rates import (
    MAX_CHUNK,
    SLACK,
    FairQueue,
    Rates,
    RateSchedule,
    Ticket,
    TicketState,
    TokenBucket,
    burst_for,
    chunk_size,
)


class BandwidthLimiter:
    """A shared rate plus a per-agent rate, with fair shares among agents.

    One instance limits all responses (``egress`` and ``per_agent``); another, with
    ``per_agent=0`` and ``agent=None`` on every call, limits upstream fetches.

    With a share below 1 (:meth:`set_share`: this process's part of a relay-wide
    cap), the shared bucket runs at ``rate * share``; ``rate`` stays the rate set.

    Args:
        rate: the shared rate in bytes/s (0 = unlimited).
        per_agent: each agent's rate in bytes/s (0 = unlimited).
        max_chunk: the largest write :meth:`chunk` suggests, in bytes
            (``limits.chunk_bytes``).

    Attributes:
        throttled_seconds: total seconds callers spent waiting in :meth:`acquire`.
        on_throttle: called with each wait (seconds) that was not zero (metrics).

    Raises:
        ValueError: a negative rate or a chunk below one byte.
    """

    def __init__(
        self, rate: float = 0, per_agent: float = 0, *, max_chunk: int = MAX_CHUNK
    ) -> None:
        if rate < 0 or per_agent < 0 or max_chunk < 1:
            raise ValueError(f"bad limiter settings: {rate=}, {per_agent=}, {max_chunk=}")
        self._rate = float(rate)
        self._share = 1.0
        self._shared_rate = self._rate  # the rate the shared bucket runs at: rate * share
        self._per_agent = float(per_agent)
        self._max_chunk = max_chunk
        self._shared = TokenBucket(self._shared_rate, burst_for(self._shared_rate))
        self._agents: dict[str, TokenBucket] = {}
        self._prune_at = 1024
        self._queue: FairQueue[asyncio.Future[None] | None] = FairQueue()
        self._timer: asyncio.Handle | None = None
        self._timer_at = 0.0  # when _timer fires (uvloop's call_at returns a plain Handle
        # without ``when()`` for a time already past)
        self._timer_loop: asyncio.AbstractEventLoop | None = None  # the loop of _timer
        self._streams: dict[str, int] = {}
        self.active_streams = 0
        self.throttled_seconds = 0.0
        self.on_throttle: Callable[[float], None] | None = None

    @property
    def limited(self) -> bool:
        """Whether any limit is set (if not, callers may skip pacing altogether)."""
        return self._rate > 0 or self._per_agent > 0

    @property
    def rate(self) -> float:
        """The shared rate in bytes/s as set (0 = unlimited), before any share."""
        return self._rate

    @property
    def share(self) -> float:
        """The part of :attr:`rate` this limiter paces at (1.0 unless shared)."""
        return self._share

    @property
    def active_flows(self) -> int:
        """Agents with a stream open or a request waiting here now."""
        return max(len(self._streams), self._queue.flows)

    @property
    def per_agent(self) -> float:
        """Each agent's rate in bytes/s (0 = unlimited)."""
        return self._per_agent

    @property
    def queued(self) -> int:
        """Requests waiting for bandwidth now."""
        return len(self._queue)

    def set_rates(self, rate: float, per_agent: float) -> None:
        """Change the rates from now on; waiting requests are re-evaluated at once.

        Raises:
            ValueError: a negative rate.
        """
        if rate < 0 or per_agent < 0:
            raise ValueError(f"a rate cannot be negative: {rate=}, {per_agent=}")
        self._apply(float(rate), self._share, float(per_agent))

    def set_share(self, share: float) -> None:
        """Pace at ``share`` of the shared rate from now on; the per-agent rate is untouched.

        Several processes serving one relay each take their part of one cap this
        way (:mod:`relay.transfer.share`); a later :meth:`set_rates` (a schedule, a
        reload) keeps the share.

        Raises:
            ValueError: ``share`` is not in ``(0, 1]``.
        """
        if not 0 < share <= 1:
            raise ValueError(f"a share must be in (0, 1], got {share}")
        self._apply(self._rate, share, self._per_agent)

    def _apply(self, rate: float, share: float, per_agent: float) -> None:
        if rate == self._rate and share == self._share and per_agent == self._per_agent:
            return
        lifted = self._per_agent > 0 and per_agent <= 0
        agents_changed = per_agent != self._per_agent
        self._rate, self._share, self._per_agent = rate, share, per_agent
        self._shared_rate = rate * share
        loop = _running_loop()
        if loop is None:
            # Outside the loop nothing can be waiting: start afresh, clocks come later.
            self._shared = TokenBucket(self._shared_rate, burst_for(self._shared_rate))
            self._agents.clear()
            return
        now = loop.time()
        self._queue.set_quantum(self._quantum())
        self._shared.set_rate(self._shared_rate, now, burst_for(self._shared_rate))
        if agents_changed:
            for bucket in self._agents.values():
                bucket.set_rate(self._per_agent, now, burst_for(self._per_agent))
        if lifted:
            self._queue.expedite()
        self._pump()

    def open_stream(self, agent: str) -> None:
        """Register a stream of ``agent`` (chunk sizes depend on how many there are)."""
        self._streams[agent] = self._streams.get(agent, 0) + 1
        self.active_streams += 1
        self._queue.set_quantum(self._quantum())

    def close_stream(self, agent: str) -> None:
        """Unregister a stream; drop the agent's bucket once it is idle."""
        self.active_streams -= 1
        left = self._streams.get(agent, 1) - 1
        if left > 0:
            self._streams[agent] = left
            return
        self._streams.pop(agent, None)
        self._queue.set_quantum(self._quantum())
        bucket = self._agents.get(agent)
        loop = _running_loop()
        if bucket is not None and loop is not None and self._droppable(agent, bucket, loop.time()):
            del self._agents[agent]

    def chunk(self, agent: str) -> int:
        """The write size for one of ``agent``'s streams now.

        The agent gets ``1 / agents`` of the shared rate, split among its own
        streams, so each of them sees a chunk every :data:`MAX_GAP` seconds.

        Returns:
            Bytes to write next (before calling :meth:`acquire` for them).
        """
        own = max(1, self._streams.get(agent, 0))
        size = self._max_chunk
        if self._shared_rate > 0:
            size = min(size, chunk_size(self._shared_rate, self._flows(agent) * own, size))
        if self._per_agent > 0:
            size = min(size, chunk_size(self._per_agent, own, size))
        return size

    def _flows(self, agent: str | None) -> int:
        """Agents sharing the shared rate: those streaming or queued, and ``agent``."""
        streaming = len(self._streams) + (agent is not None and agent not in self._streams)
        return max(1, streaming, self._queue.flows)

    def _quantum(self) -> float:
        """A single stream's fair chunk now: the most one request is charged."""
        if self._shared_rate <= 0:
            return math.inf
        return chunk_size(self._shared_rate, self._flows(None), self._max_chunk)

    async def acquire(self, agent: str | None, n: int) -> float:
        """Wait until ``n`` bytes of ``agent`` may go.

        Args:
            agent: the agent's key; ``None`` applies the shared limit only (upstream).
            n: bytes about to be written or read.

        Returns:
            The seconds spent waiting (0.0 when the bytes could go at once).

        Raises:
            asyncio.CancelledError: the caller was cancelled; its reservation is
                withdrawn and refunded.
        """
        if (self._shared_rate <= 0 and self._per_agent <= 0) or n <= 0:
            return 0.0
        loop = asyncio.get_running_loop()
        start = loop.time()
        suspended = False
        remaining = n
        granted = 0  # bytes of this call granted so far (refunded on cancellation)
        try:
            while remaining > 0:
                piece = min(remaining, self.chunk(agent) if agent is not None else self._piece())
                ticket = self._enqueue(agent, piece, loop.time())
                if ticket.state is not TicketState.GRANTED:
                    future: asyncio.Future[None] = loop.create_future()
                    ticket.item = future
                    suspended = True
                    try:
                        await future
                    except asyncio.CancelledError:
                        if not self._queue.cancel(ticket):
                            granted += piece  # granted, but the caller is gone
                        else:
                            self._refund_own(agent, piece)
                        raise
                granted += piece
                remaining -= piece
        except asyncio.CancelledError:
            self._refund(agent, granted)
            self._pump()
            raise
        finally:
            waited = loop.time() - start if suspended else 0.0
            self._count(waited)
        return waited

    def _piece(self) -> int:
        return chunk_size(self._shared_rate, self._flows(None), self._max_chunk)

    def _enqueue(
        self, agent: str | None, n: int, now: float
    ) -> Ticket[asyncio.Future[None] | None]:
        eligible_at = now
        if agent is not None and self._per_agent > 0:
            own = self._agents.get(agent)
            if own is None:
                if len(self._agents) >= self._prune_at:
                    self.prune()
                own = self._agents[agent] = TokenBucket(
                    self._per_agent, burst_for(self._per_agent), now
                )
            eligible_at = now + own.take(n, now)
        self._queue.set_quantum(self._quantum())
        ticket = self._queue.push(agent, n, None, eligible_at)
        self._pump()
        return ticket

    def _pump(self) -> None:
        """Grant what can be granted now and arm the timer for the next grant."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for ticket in self._queue.grant(now, self._shared):
            if ticket.item is not None and not ticket.item.done():
                ticket.item.set_result(None)
        wake = self._queue.next_wakeup(now, self._shared)
        timer = self._timer
        # An armed timer that fires no later than needed is kept: firing early only
        # costs one more pump, which re-arms it. A timer of another (closed) loop
        # would never fire.
        if timer is not None and (
            wake is None or self._timer_at > wake + SLACK or self._timer_loop is not loop
        ):
            timer.cancel()
            self._timer = timer = None
        if wake is not None and timer is None:
            self._timer = loop.call_at(wake, self._on_timer)
            self._timer_at = wake
            self._timer_loop = loop

    def _on_timer(self) -> None:
        self._timer = None
        self._pump()

    def _refund_own(self, agent: str | None, n: int) -> None:
        bucket = self._agents.get(agent) if agent is not None else None
        if bucket is not None:
            bucket.refund(n, asyncio.get_running_loop().time())

    def _refund(self, agent: str | None, n: int) -> None:
        if n <= 0:
            return
        self._shared.refund(n, asyncio.get_running_loop().time())
        self._refund_own(agent, n)

    def _count(self, waited: float) -> None:
        if waited <= 0:
            return
        self.throttled_seconds += waited
        if self.on_throttle is not None:
            self.on_throttle(waited)

    def _droppable(self, agent: str, bucket: TokenBucket, now: float) -> bool:
        return bucket.idle(now) and not self._queue.pending(agent) and agent not in self._streams

    def prune(self) -> None:
        """Drop the buckets of agents that are idle (full, nothing queued, no stream)."""
        loop = _running_loop()
        if loop is not None:
            now = loop.time()
            for agent in [a for a, b in self._agents.items() if self._droppable(a, b, now)]:
                del self._agents[agent]
        self._prune_at = max(1024, 2 * len(self._agents))


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Pacer:
    """One stream's view of a limiter, for one agent: chunk size and waits.

    Use as a context manager around the stream, so the limiter knows how many
    streams share it.
    """

    __slots__ = ("_agent", "_limiter")

    def __init__(self, limiter: BandwidthLimiter, agent: str) -> None:
        self._limiter = limiter
        self._agent = agent

    def chunk(self) -> int:
        """The write size now.

        Returns:
            Bytes.
        """
        return self._limiter.chunk(self._agent)

    async def wait(self, n: int) -> float:
        """Wait until ``n`` bytes may be written.

        Returns:
            The seconds waited.

        Raises:
            asyncio.CancelledError: the stream was cancelled (the reservation is refunded).
        """
        return await self._limiter.acquire(self._agent, n)

    def __enter__(self) -> Self:
        self._limiter.open_stream(self._agent)
        return self

    def __exit__(self, *exc: object) -> None:
        self._limiter.close_stream(self._agent)


def schedule_from_config(limits: LimitsSettings) -> RateSchedule:
    """The rates ``[limits]`` sets: its base rates and its ``[[limits.schedule]]`` windows.

    Args:
        limits: the validated ``[limits]`` section.

    Returns:
        The schedule.

    Raises:
        ValueError: a malformed schedule entry (the configuration validates them first).
    """
    base = Rates(upstream=limits.upstream, egress=limits.egress, per_agent=limits.per_agent)
    return RateSchedule.from_entries(base, limits.schedule)


def _local_now() -> dt.datetime:
    return dt.datetime.now().astimezone()


class RatesSource(Protocol):
    """What :func:`follow_schedule` follows: rates by the time of day."""

    def rates_at(self, when: dt.datetime) -> Rates:
        """The rates in force at ``when``."""
        ...


@dataclass(slots=True)
class LiveSchedule:
    """The schedule in force, replaceable while :func:`follow_schedule` follows it."""

    current: RateSchedule

    def rates_at(self, when: dt.datetime) -> Rates:
        """The current schedule's rates at ``when``."""
        return self.current.rates_at(when)

    def apply(
        self, schedule: RateSchedule, egress: BandwidthLimiter, upstream: BandwidthLimiter
    ) -> Rates:
        """Replace the schedule and put both limiters on its rates now (not at the next period).

        Returns:
            The rates now in force.
        """
        self.current = schedule
        rates = schedule.rates_at(_local_now())
        egress.set_rates(rates.egress, rates.per_agent)
        upstream.set_rates(rates.upstream, 0)
        return rates


async def follow_schedule(
    schedule: RatesSource,
    egress: BandwidthLimiter,
    upstream: BandwidthLimiter,
    *,
    period: float = 30.0,
    now: Callable[[], dt.datetime] = _local_now,
) -> None:
    """Keep two limiters on the rates ``schedule`` gives for the time of day; runs until cancelled.

    Every ``period`` seconds (and once at the start) ``egress`` takes the schedule's
    ``egress`` and ``per_agent`` rates and ``upstream`` its ``upstream`` rate; the
    buckets of agents that have gone idle are dropped at the same time.

    Args:
        schedule: the rates to follow.
        egress: the limiter of all responses.
        upstream: the limiter of upstream fetches.
        period: seconds between two looks at the clock.
        now: the wall-clock time whose hour and weekday select the window (local
            time by default).

    Raises:
        ValueError: ``period`` is not positive.
    """
    if not period > 0:
        raise ValueError(f"the period must be positive, got {period}")
    while True:
        rates = schedule.rates_at(now())
        egress.set_rates(rates.egress, rates.per_agent)
        upstream.set_rates(rates.upstream, 0)
        egress.prune()
        upstream.prune()
        await asyncio.sleep(period)


__all__ = [
    "BandwidthLimiter",
    "LiveSchedule",
    "Pacer",
    "RatesSource",
    "follow_schedule",
    "schedule_from_config",
]

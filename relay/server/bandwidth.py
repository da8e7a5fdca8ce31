"""Bandwidth limits: token buckets, fair queueing, time-of-day schedules.

Rules:

* The arithmetic is pure: :class:`TokenBucket`, :class:`FairQueue` and
  :class:`RateSchedule` take the time as a parameter and never read a clock;
  :func:`jain_index` and :func:`chunk_size` are plain functions. They have table
  tests of their own.
* Rates are bytes per second and 0 always means unlimited.
* Fairness is per agent, not per connection: every agent (the ``Relay-Agent-Id``,
  else the client address) is one flow of a self-clocked fair queue (SCFQ,
  Golestani 1994). Bytes are granted in order of virtual finish tags, so agents
  competing for the shared egress bucket get equal bytes however many
  connections they open or however large the requests they make. Requests larger
  than one chunk are granted piece by piece, so no single grant holds the shared
  bucket for longer than :data:`MAX_GAP`.
* A per-agent limit delays when an agent's request becomes *eligible* in the fair
  queue; it never holds the shared bucket, so an agent that waits for its own
  bucket does not waste the others' bandwidth, and the two waits overlap.
* Writes are paced in chunks that shrink as streams multiply (:func:`chunk_size`),
  so one stream waits about :data:`MAX_GAP` seconds between two writes: a TUF
  client takes a long gap for a slow-retrieval attack. A request is charged at most
  one such chunk in virtual time, so a chunk sized before other agents arrived
  does not hold its stream back for a whole round of theirs.
* :class:`BandwidthLimiter` is the asyncio side. It reads ``loop.time()`` inside
  coroutines and callbacks, takes no loop at construction, and needs no background task
  (the queue is pumped from ``acquire`` and from one timer handle). A cancelled
  waiter leaves the queue at once and its tokens are refunded, so nobody queued
  behind it waits for bytes that will never be sent. An unlimited limiter returns
  from ``acquire`` without awaiting anything.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import itertools
import math
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Generic, Self, TypeVar

from relay.config import ScheduleEntry

MAX_GAP = 0.25  # seconds: a stream's wait between two writes once shares are steady
MIN_CHUNK = 1024  # bytes: smaller writes cost more in overhead than they save in latency
MAX_CHUNK = 64 * 1024  # bytes
BURST_SECONDS = 0.05  # seconds of traffic a bucket may save up while idle
_SLACK = 1e-6  # seconds: a timer that fires this early still counts as on time
_RETAG_BELOW = 0.75  # re-tag waiting requests when the quantum shrinks below this share
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

T = TypeVar("T")


# -- pure arithmetic -----------------------------------------------------------------


class TokenBucket:
    """A token bucket (bytes) whose tokens may go negative: a debt paid back over time.

    Args:
        rate: tokens (bytes) per second; 0 means unlimited.
        burst: the most tokens that can accumulate while idle; the bucket starts full.
        now: the current time in seconds (any monotonic origin); ``None`` starts the
            clock at the first call.
    """

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: float, now: float | None = None) -> None:
        if rate < 0 or burst < 0:
            raise ValueError(f"rate and burst must be >= 0, got {rate} and {burst}")
        self._rate = float(rate)
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    @property
    def rate(self) -> float:
        """Tokens per second (0 = unlimited)."""
        return self._rate

    @property
    def burst(self) -> float:
        """The most tokens the bucket holds."""
        return self._burst

    def tokens(self, now: float) -> float:
        """Tokens available at ``now`` (negative while in debt).

        Returns:
            The balance after refilling up to ``now``.
        """
        self._refill(now)
        return self._tokens

    def _refill(self, now: float) -> None:
        if self._stamp is None or now > self._stamp:
            if self._stamp is not None:
                elapsed = now - self._stamp
                self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
            self._stamp = now

    def ready_in(self, n: float, now: float) -> float:
        """Seconds until ``n`` tokens (at most ``burst`` of them) are there; reserves nothing.

        A request larger than the burst is ready once the bucket is full; taking it
        then leaves a debt that later requests wait for.

        Returns:
            0.0 when the tokens are there now (or the bucket is unlimited).
        """
        if self._rate <= 0:
            return 0.0
        self._refill(now)
        missing = min(n, self._burst) - self._tokens
        return missing / self._rate if missing > 0 else 0.0

    def take(self, n: float, now: float) -> float:
        """Reserve ``n`` tokens now, going into debt if need be.

        Returns:
            The seconds to wait before the ``n`` bytes may go (0.0 if at once). The
            reservation stands either way; give it back with :meth:`refund`.
        """
        if self._rate <= 0:
            return 0.0
        self._refill(now)
        self._tokens -= n
        return -self._tokens / self._rate if self._tokens < 0 else 0.0

    def refund(self, n: float, now: float) -> None:
        """Give back ``n`` reserved tokens (a cancelled reservation), up to the burst."""
        if self._rate <= 0:
            return
        self._refill(now)
        self._tokens = min(self._burst, self._tokens + n)

    def set_rate(self, rate: float, now: float, burst: float | None = None) -> None:
        """Change the rate from ``now`` on.

        Debt already owed is kept (paid at the new rate). Leaving the unlimited
        state starts with a full bucket; entering it forgets any debt.

        Args:
            rate: the new rate in tokens per second (0 = unlimited).
            now: the current time.
            burst: the new burst; ``None`` keeps the current one.

        Raises:
            ValueError: a negative rate or burst.
        """
        if rate < 0 or (burst is not None and burst < 0):
            raise ValueError(f"rate and burst must be >= 0, got {rate} and {burst}")
        self._refill(now)
        was_unlimited = self._rate <= 0
        self._rate = float(rate)
        if burst is not None:
            self._burst = float(burst)
        if was_unlimited or self._rate <= 0:
            self._tokens = self._burst
        else:
            self._tokens = min(self._tokens, self._burst)

    def idle(self, now: float) -> bool:
        """Whether the bucket is full, so dropping it loses nothing.

        Returns:
            True when unlimited or full.
        """
        if self._rate <= 0:
            return True
        self._refill(now)
        return self._tokens >= self._burst


def burst_for(rate: float) -> float:
    """The burst of a bucket at ``rate``: :data:`BURST_SECONDS` of traffic, >= one chunk.

    Returns:
        The burst in bytes (at least :data:`MIN_CHUNK`).
    """
    return max(float(MIN_CHUNK), rate * BURST_SECONDS)


def chunk_size(rate: float, streams: int = 1, max_chunk: int = MAX_CHUNK) -> int:
    """The write size for ``streams`` streams served in turn from ``rate`` bytes/s.

    Streams served fairly each write one chunk per round, and a round of
    ``streams`` chunks lasts ``streams * chunk / rate`` seconds; a chunk of
    ``rate * MAX_GAP / streams`` keeps every stream's wait between two writes
    under :data:`MAX_GAP`. That is a quarter of the one-second budget because
    streams that start together size their first chunks before they know of one
    another: the k-th of them takes ``1/k`` of the rate, so the first round of
    ``n`` streams lasts up to ``MAX_GAP * (1 + 1/2 + ... + 1/n)`` (1.1 s for 50
    streams at a low rate; the ``max_chunk`` cap shortens it at high rates).

    The result is clamped to ``[MIN_CHUNK, max_chunk]``: below 1 KiB the
    per-write cost (a system call, a TCP segment, HTTP framing) outweighs the
    latency gained, so the gap bound holds while each stream gets at least
    ``MIN_CHUNK / MAX_GAP`` (4 KiB/s); beyond that the gap grows to
    ``MIN_CHUNK * streams / rate``, and ``limits.max_transfers`` bounds the streams.

    Args:
        rate: bytes per second shared by the streams; 0 = unlimited.
        streams: how many streams share ``rate`` (values below 1 count as 1).
        max_chunk: the largest write.

    Returns:
        The chunk size in bytes (``max_chunk`` when unlimited).
    """
    if rate <= 0:
        return max_chunk
    size = int(rate * MAX_GAP / max(1, streams))
    return max(min(MIN_CHUNK, max_chunk), min(max_chunk, size))


def jain_index(values: Iterable[float]) -> float:
    """Jain's fairness index ``(sum x)^2 / (n * sum x^2)``.

    Returns:
        1.0 when every value is equal (or there are none, or all are 0), down to
        ``1/n`` when one value takes everything.
    """
    xs = list(values)
    squares = sum(x * x for x in xs)
    if not xs or squares == 0:
        return 1.0
    total = sum(xs)
    return total * total / (len(xs) * squares)


class TicketState(Enum):
    """Where a request stands in a :class:`FairQueue`."""

    WAITING = "waiting"
    GRANTED = "granted"
    CANCELLED = "cancelled"


@dataclass(eq=False, slots=True)
class Ticket(Generic[T]):
    """One request for ``size`` bytes of ``flow`` in a :class:`FairQueue`."""

    flow: Hashable
    size: float
    item: T
    vstart: float  # the queue's virtual time when it was pushed
    tag: float  # virtual finish time: served in increasing order
    eligible_at: float  # not served before this time (the flow's own limit)
    seq: int
    state: TicketState = TicketState.WAITING


class FairQueue(Generic[T]):
    """Self-clocked fair queueing (SCFQ) of byte requests over one token bucket.

    A request of ``n`` bytes from flow ``f`` gets the finish tag
    ``max(V, last tag of f) + min(n, quantum)``, where the virtual time ``V`` is
    the tag of the last request granted. Granting in increasing tag order gives
    every backlogged flow the same number of bytes, whatever the sizes of its
    requests (up to the quantum) or how many it has outstanding, and a flow that
    was idle starts level with the others (no saved-up credit). A request may
    carry an ``eligible_at`` time (the flow's own rate limit); until then it steps
    aside and keeps its tag.

    The quantum is the chunk a single stream should be writing now. A request
    larger than it (sized before more flows arrived) is charged as one quantum:
    charging it in full would hold its flow back for ``flows * size / rate``
    seconds, a gap a TUF client takes for a slow-retrieval attack. When the
    quantum shrinks by a quarter or more, waiting requests are tagged again.

    Pure: the caller passes the time and the bucket; nothing here sleeps.
    """

    __slots__ = (
        "_keyed",
        "_later",
        "_pending",
        "_quantum",
        "_ready",
        "_seq",
        "_tails",
        "_vtime",
    )

    def __init__(self, quantum: float = math.inf) -> None:
        if quantum <= 0:
            raise ValueError(f"the quantum must be positive, got {quantum}")
        self._ready: list[tuple[float, int, Ticket[T]]] = []  # by tag
        self._later: list[tuple[float, int, Ticket[T]]] = []  # by eligible_at
        self._tails: dict[Hashable, float] = {}  # flow -> last tag handed out
        self._pending: dict[Hashable, int] = {}  # flow -> waiting tickets
        self._vtime = 0.0
        self._seq = itertools.count()
        self._quantum = quantum  # for new tags
        self._keyed = quantum  # the largest quantum waiting tags were computed with

    def __len__(self) -> int:
        """The number of waiting tickets."""
        return sum(self._pending.values())

    @property
    def flows(self) -> int:
        """The number of flows with waiting tickets."""
        return len(self._pending)

    @property
    def quantum(self) -> float:
        """The most bytes one request is charged (see the class docstring)."""
        return self._quantum

    def set_quantum(self, quantum: float) -> None:
        """Change the quantum; a much smaller one re-tags the waiting requests.

        Raises:
            ValueError: ``quantum`` is not positive.
        """
        if quantum <= 0:
            raise ValueError(f"the quantum must be positive, got {quantum}")
        self._quantum = quantum
        if quantum < self._keyed * _RETAG_BELOW:
            self._retag()

    def _retag(self) -> None:
        """Tag every waiting ticket again with the current quantum, flow by flow."""
        waiting = sorted(
            (t for _, _, t in itertools.chain(self._ready, self._later) if _waiting(t)),
            key=lambda t: t.seq,
        )
        self._tails.clear()
        for t in waiting:
            start = max(t.vstart, self._tails.get(t.flow, t.vstart))
            t.tag = self._tails[t.flow] = start + min(t.size, self._quantum)
        self._ready = [(t.tag, t.seq, t) for _, _, t in self._ready if _waiting(t)]
        heapq.heapify(self._ready)
        self._later = [entry for entry in self._later if _waiting(entry[2])]
        heapq.heapify(self._later)
        self._keyed = self._quantum

    def pending(self, flow: Hashable) -> int:
        """The number of waiting tickets of ``flow``.

        Returns:
            0 when the flow has none.
        """
        return self._pending.get(flow, 0)

    def push(self, flow: Hashable, size: float, item: T, eligible_at: float) -> Ticket[T]:
        """Queue a request of ``size`` bytes; it is served by :meth:`grant`.

        Args:
            flow: the flow (agent) it belongs to.
            size: bytes requested (> 0).
            item: carried for the caller (a future to resolve, for instance).
            eligible_at: the earliest time it may be granted.

        Returns:
            The ticket, to pass to :meth:`cancel`.

        Raises:
            ValueError: ``size`` is not positive.
        """
        if size <= 0:
            raise ValueError(f"a request must be for at least one byte, got {size}")
        tag = max(self._vtime, self._tails.get(flow, 0.0)) + min(size, self._quantum)
        self._tails[flow] = tag
        self._pending[flow] = self._pending.get(flow, 0) + 1
        self._keyed = max(self._keyed, self._quantum)
        ticket = Ticket(flow, size, item, self._vtime, tag, eligible_at, next(self._seq))
        heapq.heappush(self._later, (eligible_at, ticket.seq, ticket))
        return ticket

    def cancel(self, ticket: Ticket[T]) -> bool:
        """Withdraw a waiting ticket (it is skipped when it reaches the head).

        Returns:
            True if it was waiting; False if it was already granted or cancelled.
        """
        if ticket.state is not TicketState.WAITING:
            return False
        ticket.state = TicketState.CANCELLED
        self._leave(ticket)
        return True

    def expedite(self) -> None:
        """Make every waiting ticket eligible now (the per-flow limit was lifted)."""
        for _, _, ticket in self._later:
            ticket.eligible_at = float("-inf")

    def grant(self, now: float, bucket: TokenBucket) -> list[Ticket[T]]:
        """Grant, in tag order, every eligible ticket the bucket can pay for at ``now``.

        A granted ticket's bytes are taken from ``bucket``.

        Returns:
            The tickets granted, in order.
        """
        later = self._later
        while later and (later[0][2].eligible_at <= now + _SLACK):
            _, _, ticket = heapq.heappop(later)
            if ticket.state is TicketState.WAITING:
                heapq.heappush(self._ready, (ticket.tag, ticket.seq, ticket))
        granted: list[Ticket[T]] = []
        ready = self._ready
        while ready:
            ticket = ready[0][2]
            if ticket.state is not TicketState.WAITING:
                heapq.heappop(ready)
                continue
            if bucket.ready_in(ticket.size, now) > _SLACK:
                break
            heapq.heappop(ready)
            bucket.take(ticket.size, now)
            ticket.state = TicketState.GRANTED
            self._vtime = ticket.tag
            self._leave(ticket)
            granted.append(ticket)
        return granted

    def next_wakeup(self, now: float, bucket: TokenBucket) -> float | None:
        """When :meth:`grant` may have something to grant next.

        Returns:
            A time (>= ``now``), or ``None`` when nothing waits.
        """
        for heap in (self._ready, self._later):
            while heap and heap[0][2].state is not TicketState.WAITING:
                heapq.heappop(heap)
        times = []
        if self._ready:
            times.append(now + bucket.ready_in(self._ready[0][2].size, now))
        if self._later:
            times.append(max(now, self._later[0][2].eligible_at))
        return min(times) if times else None

    def _leave(self, ticket: Ticket[T]) -> None:
        left = self._pending[ticket.flow] - 1
        if left:
            self._pending[ticket.flow] = left
            return
        del self._pending[ticket.flow]
        del self._tails[ticket.flow]
        if not self._pending:
            self._vtime = 0.0  # nobody waits: restart virtual time (keeps floats small)
            self._keyed = self._quantum


def _waiting(ticket: Ticket[T]) -> bool:
    return ticket.state is TicketState.WAITING


# -- schedules -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rates:
    """Rates in bytes per second (0 = unlimited)."""

    upstream: int = 0
    egress: int = 0
    per_agent: int = 0


@dataclass(frozen=True, slots=True)
class Window:
    """A time-of-day window with rates that replace the base ones while it is open.

    ``end`` before ``start`` wraps midnight, and the part after midnight belongs
    to the day the window opened (so ``days`` name the evening, as people say
    "Friday night"). ``end`` equal to ``start`` is the whole day.
    """

    start: int  # minutes after midnight
    end: int  # minutes after midnight; <= start wraps midnight
    days: frozenset[int]  # 0 = Monday; empty = every day
    upstream: int | None = None  # bytes/s; None = the base rate
    egress: int | None = None
    per_agent: int | None = None

    @classmethod
    def parse(
        cls,
        start: str,
        end: str,
        days: Sequence[str] = (),
        *,
        upstream: int | None = None,
        egress: int | None = None,
        per_agent: int | None = None,
    ) -> Window:
        """Build from ``HH:MM`` strings and day names (``mon`` .. ``sun``).

        Returns:
            The window.

        Raises:
            ValueError: a malformed time, an unknown day or a negative rate.
        """
        for rate in (upstream, egress, per_agent):
            if rate is not None and rate < 0:
                raise ValueError(f"a rate cannot be negative, got {rate}")
        return cls(
            _minutes(start),
            _minutes(end),
            frozenset(_day(d) for d in days),
            upstream,
            egress,
            per_agent,
        )

    def contains(self, when: dt.datetime) -> bool:
        """Whether ``when`` (read as the wall-clock time it carries) falls in the window.

        Returns:
            True inside ``[start, end)``.
        """
        minute = when.hour * 60 + when.minute
        day = when.weekday()
        if self.start < self.end:
            return self._on(day) and self.start <= minute < self.end
        if minute >= self.start:
            return self._on(day)
        if minute < self.end:
            return self._on((day - 1) % 7)  # after midnight: the previous day's window
        return False

    def _on(self, day: int) -> bool:
        return not self.days or day in self.days


def _minutes(text: str) -> int:
    hours, sep, minutes = text.partition(":")
    if not sep or len(minutes) != 2 or not hours.isdigit() or not minutes.isdigit():
        raise ValueError(f"{text!r} is not HH:MM")
    h, m = int(hours), int(minutes)
    if not (0 <= h < 24 and 0 <= m < 60):
        raise ValueError(f"{text!r} is not HH:MM")
    return h * 60 + m


def _day(name: str) -> int:
    try:
        return _DAYS.index(name.lower())
    except ValueError:
        raise ValueError(f"unknown day {name!r} (use {', '.join(_DAYS)})") from None


@dataclass(frozen=True, slots=True)
class RateSchedule:
    """Base rates and time-of-day windows; the first open window wins."""

    base: Rates = field(default_factory=Rates)
    windows: tuple[Window, ...] = ()

    @classmethod
    def from_entries(cls, base: Rates, entries: Iterable[ScheduleEntry]) -> RateSchedule:
        """Build from ``[[limits.schedule]]`` entries.

        Returns:
            The schedule.

        Raises:
            ValueError: a malformed entry.
        """
        windows = tuple(
            Window.parse(
                e.start, e.end, e.days, upstream=e.upstream, egress=e.egress, per_agent=e.per_agent
            )
            for e in entries
        )
        return cls(base, windows)

    def rates_at(self, when: dt.datetime) -> Rates:
        """The rates in force at ``when`` (its wall-clock time and weekday).

        Returns:
            The first open window's rates, each falling back to the base rate.
        """
        for w in self.windows:
            if w.contains(when):
                return Rates(
                    upstream=self.base.upstream if w.upstream is None else w.upstream,
                    egress=self.base.egress if w.egress is None else w.egress,
                    per_agent=self.base.per_agent if w.per_agent is None else w.per_agent,
                )
        return self.base


def schedule_from_config(
    upstream: int, egress: int, per_agent: int, entries: Iterable[ScheduleEntry]
) -> RateSchedule:
    """Build a :class:`RateSchedule` from ``[limits]`` values.

    Returns:
        The schedule.

    Raises:
        ValueError: a malformed entry.
    """
    return RateSchedule.from_entries(Rates(upstream, egress, per_agent), entries)


# -- asyncio -------------------------------------------------------------------------


class LimiterRole(StrEnum):
    """Which rates of a :class:`RateSchedule` a limiter follows (also a metrics label)."""

    EGRESS = "egress"  # egress + per_agent
    UPSTREAM = "upstream"  # upstream only


class BandwidthLimiter:
    """A shared rate plus a per-agent rate, with fair shares among agents.

    One instance limits all responses (``egress`` and ``per_agent``); another, with
    ``per_agent=0`` and ``agent=None`` on every call, limits upstream fetches.

    Args:
        rate: the shared rate in bytes/s (0 = unlimited).
        per_agent: each agent's rate in bytes/s (0 = unlimited).
        max_chunk: the largest write :meth:`chunk` suggests, in bytes.
        schedule: time-of-day rates for :meth:`apply_schedule`; by default the
            constant ``rate`` and ``per_agent``.
        role: which of the schedule's rates apply.

    Attributes:
        throttled_seconds: total seconds callers spent waiting in :meth:`acquire`.
        on_throttle: called with each wait (seconds) that was not zero (metrics).
        schedule: the rates :meth:`apply_schedule` follows.
        role: which of them.

    Raises:
        ValueError: a negative rate or a chunk below one byte.
    """

    def __init__(
        self,
        rate: float = 0,
        per_agent: float = 0,
        *,
        max_chunk: int = MAX_CHUNK,
        schedule: RateSchedule | None = None,
        role: LimiterRole = LimiterRole.EGRESS,
    ) -> None:
        if rate < 0 or per_agent < 0 or max_chunk < 1:
            raise ValueError(f"bad limiter settings: {rate=}, {per_agent=}, {max_chunk=}")
        self._rate = float(rate)
        self._per_agent = float(per_agent)
        self._max_chunk = max_chunk
        self.role = role
        if schedule is None:
            base = (
                Rates(upstream=int(rate))
                if role is LimiterRole.UPSTREAM
                else Rates(egress=int(rate), per_agent=int(per_agent))
            )
            schedule = RateSchedule(base)
        self.schedule = schedule
        self._shared = TokenBucket(self._rate, burst_for(self._rate))
        self._agents: dict[str, TokenBucket] = {}
        self._prune_at = 1024
        self._queue: FairQueue[asyncio.Future[None] | None] = FairQueue()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None  # the loop of _timer
        self._streams: dict[str, int] = {}
        self.active_streams = 0
        self.throttled_seconds = 0.0
        self.on_throttle: Callable[[float], None] | None = None

    @classmethod
    def from_schedule(
        cls,
        schedule: RateSchedule,
        role: LimiterRole,
        now: dt.datetime,
        *,
        max_chunk: int = MAX_CHUNK,
    ) -> Self:
        """A limiter that follows ``schedule``, starting with the rates in force at ``now``.

        Returns:
            The limiter; call :meth:`apply_schedule` periodically to follow the clock.
        """
        rates = schedule.rates_at(now)
        if role is LimiterRole.UPSTREAM:
            return cls(rates.upstream, 0, max_chunk=max_chunk, schedule=schedule, role=role)
        return cls(rates.egress, rates.per_agent, max_chunk=max_chunk, schedule=schedule, role=role)

    @property
    def limited(self) -> bool:
        """Whether any limit is set (if not, callers may skip pacing altogether)."""
        return self._rate > 0 or self._per_agent > 0

    @property
    def rate(self) -> float:
        """The shared rate in bytes/s (0 = unlimited)."""
        return self._rate

    @property
    def per_agent(self) -> float:
        """Each agent's rate in bytes/s (0 = unlimited)."""
        return self._per_agent

    @property
    def queued(self) -> int:
        """Requests waiting for bandwidth now."""
        return len(self._queue)

    def apply_schedule(self, now: dt.datetime) -> Rates:
        """Switch to the rates the schedule gives for ``now`` (call it every minute or so).

        Also drops the buckets of agents that have been idle.

        Returns:
            The schedule's rates at ``now``.
        """
        rates = self.schedule.rates_at(now)
        if self.role is LimiterRole.UPSTREAM:
            self.set_rates(rates.upstream, 0)
        else:
            self.set_rates(rates.egress, rates.per_agent)
        self._prune()
        return rates

    def set_rates(self, rate: float, per_agent: float) -> None:
        """Change the rates from now on; waiting requests are re-evaluated at once.

        Raises:
            ValueError: a negative rate.
        """
        if rate < 0 or per_agent < 0:
            raise ValueError(f"a rate cannot be negative: {rate=}, {per_agent=}")
        if rate == self._rate and per_agent == self._per_agent:
            return
        lifted = self._per_agent > 0 and per_agent <= 0
        self._rate, self._per_agent = float(rate), float(per_agent)
        loop = _running_loop()
        if loop is None:
            # Outside the loop nothing can be waiting: start afresh, clocks come later.
            self._shared = TokenBucket(self._rate, burst_for(self._rate))
            self._agents.clear()
            return
        now = loop.time()
        self._queue.set_quantum(self._quantum())
        self._shared.set_rate(self._rate, now, burst_for(self._rate))
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
        if self._rate > 0:
            size = min(size, chunk_size(self._rate, self._flows(agent) * own, size))
        if self._per_agent > 0:
            size = min(size, chunk_size(self._per_agent, own, size))
        return size

    def _flows(self, agent: str | None) -> int:
        """Agents sharing the shared rate: those streaming or queued, and ``agent``."""
        streaming = len(self._streams) + (agent is not None and agent not in self._streams)
        return max(1, streaming, self._queue.flows)

    def _quantum(self) -> float:
        """A single stream's fair chunk now: the most one request is charged."""
        if self._rate <= 0:
            return math.inf
        return chunk_size(self._rate, self._flows(None), self._max_chunk)

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
        if (self._rate <= 0 and self._per_agent <= 0) or n <= 0:
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
        return chunk_size(self._rate, self._flows(None), self._max_chunk)

    def _enqueue(
        self, agent: str | None, n: int, now: float
    ) -> Ticket[asyncio.Future[None] | None]:
        eligible_at = now
        if agent is not None and self._per_agent > 0:
            own = self._agents.get(agent)
            if own is None:
                if len(self._agents) >= self._prune_at:
                    self._prune()
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
            wake is None or timer.when() > wake + _SLACK or self._timer_loop is not loop
        ):
            timer.cancel()
            self._timer = timer = None
        if wake is not None and timer is None:
            self._timer = loop.call_at(wake, self._on_timer)
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

    def _prune(self) -> None:
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


__all__ = [
    "MAX_CHUNK",
    "MAX_GAP",
    "MIN_CHUNK",
    "BandwidthLimiter",
    "FairQueue",
    "LimiterRole",
    "Pacer",
    "RateSchedule",
    "Rates",
    "Ticket",
    "TicketState",
    "TokenBucket",
    "Window",
    "burst_for",
    "chunk_size",
    "jain_index",
    "schedule_from_config",
]

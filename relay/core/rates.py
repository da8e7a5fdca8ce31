"""Rate arithmetic: token buckets, fair queueing, time-of-day schedules.

Rules:

* Pure: nothing here reads a clock, sleeps or does I/O. :class:`TokenBucket` and
  :class:`FairQueue` take the time (seconds, any monotonic origin) as a parameter;
  :class:`RateSchedule` takes the wall-clock time as a ``datetime``;
  :func:`chunk_size`, :func:`burst_for`, :func:`jain_index` and :func:`egress_shares`
  are plain functions.
  The asyncio side (waiting, timers, refunds of cancelled waiters) is
  :mod:`relay.transfer.bandwidth`.
* Rates are bytes per second and 0 always means unlimited.
* Fairness is per flow (an agent), not per request: :class:`FairQueue` is a
  self-clocked fair queue (SCFQ, Golestani 1994). Bytes are granted in order of
  virtual finish tags, so flows competing for one bucket get equal bytes however
  many requests they queue or however large they are (up to the quantum).
* Writes are paced in chunks that shrink as streams multiply (:func:`chunk_size`),
  so one stream waits about :data:`MAX_GAP` seconds between two writes: a TUF
  client takes a long gap for a slow-retrieval attack.
* One egress cap over several processes: each process takes the part of the cap
  :func:`egress_shares` gives it from every process's active flows, so each agent of
  the relay gets about ``cap / flows`` wherever it is served (the fair queue shares
  a process's part among its own agents). :mod:`relay.transfer.share` publishes the
  flows and applies the parts.
* A schedule is values: :class:`ScheduleEntry` (as configured, ``HH:MM`` and day
  names) parsed into :class:`Window` (minutes and weekday numbers) by
  :meth:`RateSchedule.from_entries`; the configuration builds entries, this module
  never reads the configuration.
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Generic, TypeVar

MAX_GAP = 0.25  # seconds: a stream's wait between two writes once shares are steady
MIN_CHUNK = 1024  # bytes: smaller writes cost more in overhead than they save in latency
MAX_CHUNK = 64 * 1024  # bytes
BURST_SECONDS = 0.05  # seconds of traffic a bucket may save up while idle
SLACK = 1e-6  # seconds: a timer that fires this early still counts as on time
IDLE_SHARE = 0.02  # the part of an egress cap kept for processes with no flow, together
_RETAG_BELOW = 0.75  # re-tag waiting requests when the quantum shrinks below this share
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

T = TypeVar("T")


# -- token bucket, chunk sizes, fairness index ----------------------------------------


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


def egress_shares(flows: Sequence[int | None], idle_share: float = IDLE_SHARE) -> tuple[float, ...]:
    """Each process's part of a relay-wide egress cap, from the flows each one serves.

    A flow is an agent with a transfer waiting or running in that process. Parts
    are proportional to flows, so with fair queueing inside each process every
    agent of the relay gets about ``cap / total flows``. A live process with no
    flow gets a small floor (``idle_share`` split over the live processes), so
    a new flow starts at once instead of waiting for its process's next look at
    the others; when no process has a flow, the live ones share the cap evenly.

    Args:
        flows: per process (slot), its flows, or ``None`` when it is not live (no
            recent heartbeat: a dead or stuck process, which must not hold bandwidth).
            Negative counts are read as 0.
        idle_share: the part of the cap set aside for idle live processes together,
            in ``[0, 1)``.

    Returns:
        One fraction per slot: 0 for slots that are not live, the others summing
        to 1 (all 0 when no slot is live).

    Raises:
        ValueError: ``idle_share`` is outside ``[0, 1)``.
    """
    if not 0 <= idle_share < 1:
        raise ValueError(f"the idle share must be in [0, 1), got {idle_share}")
    live = [f for f in flows if f is not None]
    busy = sum(max(0, f) for f in live)
    if not live:
        return tuple(0.0 for _ in flows)
    if busy == 0:
        return tuple(0.0 if f is None else 1 / len(live) for f in flows)
    floor = idle_share / len(live)
    idle = sum(1 for f in live if f <= 0)
    rest = 1 - floor * idle
    return tuple(0.0 if f is None else (rest * f / busy if f > 0 else floor) for f in flows)


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
        while later and (later[0][2].eligible_at <= now + SLACK):
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
            if bucket.ready_in(ticket.size, now) > SLACK:
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
class ScheduleEntry:
    """A time-of-day window with its own rates (bytes/s; ``None`` = the base rate)."""

    start: str  # HH:MM, local time
    end: str  # HH:MM; before start: wraps midnight; equal to start: all day
    days: tuple[str, ...] = ()  # mon..sun, the days the window opens on; () = every day
    upstream: int | None = None  # bytes/s
    egress: int | None = None  # bytes/s
    per_agent: int | None = None  # bytes/s


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
    if not sep or len(minutes) != 2 or not (hours + minutes).isascii():
        raise ValueError(f"{text!r} is not HH:MM")
    if not hours.isdigit() or not minutes.isdigit():
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


__all__ = [
    "BURST_SECONDS",
    "IDLE_SHARE",
    "MAX_CHUNK",
    "MAX_GAP",
    "MIN_CHUNK",
    "SLACK",
    "FairQueue",
    "RateSchedule",
    "Rates",
    "ScheduleEntry",
    "Ticket",
    "TicketState",
    "TokenBucket",
    "Window",
    "burst_for",
    "chunk_size",
    "egress_shares",
    "jain_index",
]

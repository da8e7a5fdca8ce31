"""Bandwidth limits: token buckets, fair sharing, time-of-day schedules.

Rules:

* The arithmetic is pure: :class:`TokenBucket` and :class:`RateSchedule` take the
  time as a parameter and never read a clock; :func:`jain_index` and
  :func:`chunk_size` are plain functions. They have table tests of their own.
* A bucket lends: :meth:`TokenBucket.reserve` always succeeds and returns how long
  the caller must wait, so concurrent writers queue in reservation order. Each
  stream reserves one chunk at a time (reserve, wait, write, repeat), so streams
  competing for the shared egress bucket are served round-robin: fair shares, and
  a greedy client cannot reserve ahead of the others.
* Chunks shrink as streams multiply, so that one stream never waits more than
  :data:`MAX_GAP` seconds between two writes (a TUF client takes a long gap for a
  slow-retrieval attack).
* :class:`BandwidthLimiter` is the asyncio side: it reads ``loop.time()`` inside
  coroutines, refunds a reservation whose waiter is cancelled, and costs nothing
  when no limit is set.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Self

from relay.config import ScheduleEntry

MAX_GAP = 0.5  # seconds: the longest wait a stream should see between two writes
MIN_CHUNK = 1024  # bytes
MAX_CHUNK = 64 * 1024  # bytes
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class TokenBucket:
    """A token bucket that lends: tokens may go negative (debt), paid back over time.

    Args:
        rate: tokens (bytes) per second; 0 means unlimited.
        burst: the most tokens that can accumulate while idle.
        now: the current time (seconds, any monotonic origin).
    """

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate = float(rate)
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = now

    @property
    def rate(self) -> float:
        """Tokens per second (0 = unlimited)."""
        return self._rate

    def _refill(self, now: float) -> None:
        if now > self._stamp:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now

    def reserve(self, n: float, now: float) -> float:
        """Take ``n`` tokens; return the seconds to wait before using them."""
        if self._rate <= 0:
            return 0.0
        self._refill(now)
        self._tokens -= n
        if self._tokens >= 0:
            return 0.0
        return -self._tokens / self._rate

    def refund(self, n: float, now: float) -> None:
        """Give back ``n`` tokens (a cancelled reservation)."""
        if self._rate <= 0:
            return
        self._refill(now)
        self._tokens = min(self._burst, self._tokens + n)

    def set_rate(self, rate: float, burst: float, now: float) -> None:
        """Change the rate from ``now`` on (debt already owed is kept)."""
        self._refill(now)
        self._rate = float(rate)
        self._burst = float(burst)
        self._tokens = min(self._tokens, self._burst)

    def idle(self, now: float) -> bool:
        """Whether the bucket is full (it can be dropped without losing anything)."""
        self._refill(now)
        return self._rate <= 0 or self._tokens >= self._burst


def burst_for(rate: float) -> float:
    """A small burst (50 ms of traffic, at least one minimum chunk) keeps pacing smooth."""
    return max(MIN_CHUNK, rate * 0.05)


def chunk_size(rate: float, streams: int, max_chunk: int = MAX_CHUNK) -> int:
    """The write size for ``streams`` round-robin streams sharing ``rate`` bytes/s.

    Each stream then waits at most :data:`MAX_GAP` seconds between two writes
    (down to :data:`MIN_CHUNK`); ``rate`` 0 means unlimited.
    """
    if rate <= 0:
        return max_chunk
    size = int(rate * MAX_GAP / max(1, streams))
    return max(MIN_CHUNK, min(max_chunk, size))


def jain_index(values: Iterable[float]) -> float:
    """Jain's fairness index: 1.0 when every value is equal, 1/n at worst."""
    xs = list(values)
    if not xs:
        return 1.0
    total = sum(xs)
    squares = sum(x * x for x in xs)
    if squares == 0:
        return 1.0
    return total * total / (len(xs) * squares)


@dataclass(frozen=True, slots=True)
class Rates:
    """Rates in bytes per second (0 = unlimited)."""

    upstream: int = 0
    egress: int = 0
    per_agent: int = 0


@dataclass(frozen=True, slots=True)
class Window:
    """A time-of-day window with rates that replace the base ones while it is open."""

    start: int  # minutes after midnight
    end: int  # minutes after midnight; <= start wraps midnight
    days: frozenset[int]  # 0 = Monday; empty = every day
    upstream: int | None = None
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
        """Build from ``HH:MM`` strings and day names.

        Raises:
            ValueError: a malformed time or an unknown day.
        """
        return cls(
            _minutes(start),
            _minutes(end),
            frozenset(_day(d) for d in days),
            upstream,
            egress,
            per_agent,
        )

    def contains(self, when: dt.datetime) -> bool:
        """Whether ``when`` (local time) falls in the window."""
        minute = when.hour * 60 + when.minute
        day = when.weekday()
        if self.start < self.end:
            return (not self.days or day in self.days) and self.start <= minute < self.end
        # Wraps midnight: the part after midnight belongs to the previous day's window.
        if minute >= self.start:
            return not self.days or day in self.days
        if minute < self.end:
            return not self.days or (day - 1) % 7 in self.days
        return False


def _minutes(text: str) -> int:
    hours, sep, minutes = text.partition(":")
    if not sep or not hours.isdigit() or not minutes.isdigit():
        raise ValueError(f"{text!r} is not HH:MM")
    h, m = int(hours), int(minutes)
    if not (0 <= h < 24 and 0 <= m < 60):
        raise ValueError(f"{text!r} is not HH:MM")
    return h * 60 + m


def _day(name: str) -> int:
    try:
        return _DAYS.index(name)
    except ValueError:
        raise ValueError(f"unknown day {name!r}") from None


@dataclass(frozen=True, slots=True)
class RateSchedule:
    """Base rates and time-of-day windows; the first open window wins."""

    base: Rates
    windows: tuple[Window, ...] = ()

    def rates_at(self, when: dt.datetime) -> Rates:
        """The rates in force at ``when`` (local time)."""
        for w in self.windows:
            if w.contains(when):
                return Rates(
                    upstream=self.base.upstream if w.upstream is None else w.upstream,
                    egress=self.base.egress if w.egress is None else w.egress,
                    per_agent=self.base.per_agent if w.per_agent is None else w.per_agent,
                )
        return self.base


class BandwidthLimiter:
    """Egress plus per-agent limits (or one upstream limit with ``per_agent=0``).

    Args:
        rate: the shared rate in bytes/s (0 = unlimited).
        per_agent: each agent's rate in bytes/s (0 = unlimited).
    """

    def __init__(self, rate: float = 0, per_agent: float = 0) -> None:
        self._rate = float(rate)
        self._per_agent = float(per_agent)
        self._shared: TokenBucket | None = None
        self._agents: dict[str, TokenBucket] = {}
        self._streams: dict[str, int] = {}
        self.active_streams = 0
        self.throttled_seconds = 0.0
        # Called with each wait, in seconds (metrics).
        self.on_throttle: Callable[[float], None] | None = None

    @property
    def limited(self) -> bool:
        """Whether any limit is set (if not, callers skip pacing altogether)."""
        return self._rate > 0 or self._per_agent > 0

    def set_rates(self, rate: float, per_agent: float) -> None:
        """Change the rates (schedules); buckets keep what they owe."""
        now = asyncio.get_running_loop().time()
        self._rate, self._per_agent = float(rate), float(per_agent)
        if self._shared is not None:
            self._shared.set_rate(rate, burst_for(rate), now)
        for bucket in self._agents.values():
            bucket.set_rate(per_agent, burst_for(per_agent), now)

    def open_stream(self, agent: str) -> None:
        """Register a stream of ``agent`` (chunk sizes depend on how many there are)."""
        self._streams[agent] = self._streams.get(agent, 0) + 1
        self.active_streams += 1

    def close_stream(self, agent: str) -> None:
        """Unregister a stream; drop the agent's bucket once it is idle."""
        self.active_streams -= 1
        left = self._streams.get(agent, 1) - 1
        if left > 0:
            self._streams[agent] = left
            return
        self._streams.pop(agent, None)
        bucket = self._agents.get(agent)
        if bucket is not None and bucket.idle(asyncio.get_running_loop().time()):
            del self._agents[agent]

    def chunk(self, agent: str) -> int:
        """The write size for one of ``agent``'s streams now."""
        size = chunk_size(self._rate, self.active_streams)
        if self._per_agent > 0:
            size = min(size, chunk_size(self._per_agent, self._streams.get(agent, 1)))
        return size

    async def acquire(self, agent: str | None, n: int) -> None:
        """Wait until ``n`` bytes of ``agent`` may go (``None``: the shared limit only)."""
        if not self.limited:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        delay = 0.0
        shared = None
        if self._rate > 0:
            shared = self._shared
            if shared is None:
                shared = self._shared = TokenBucket(self._rate, burst_for(self._rate), now)
            delay = shared.reserve(n, now)
        own = None
        if agent is not None and self._per_agent > 0:
            own = self._agents.get(agent)
            if own is None:
                own = self._agents[agent] = TokenBucket(
                    self._per_agent, burst_for(self._per_agent), now
                )
            delay = max(delay, own.reserve(n, now))
        if delay <= 0:
            return
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            # Give the tokens back so a vanished client does not slow the others.
            later = loop.time()
            if shared is not None:
                shared.refund(n, later)
            if own is not None:
                own.refund(n, later)
            raise
        self.throttled_seconds += delay
        if self.on_throttle is not None:
            self.on_throttle(delay)


class Pacer:
    """One stream's view of a limiter: chunk size and waits, for one agent."""

    __slots__ = ("_agent", "_limiter")

    def __init__(self, limiter: BandwidthLimiter, agent: str) -> None:
        self._limiter = limiter
        self._agent = agent

    def chunk(self) -> int:
        """The write size now."""
        return self._limiter.chunk(self._agent)

    async def wait(self, n: int) -> None:
        """Wait until ``n`` bytes may be written."""
        await self._limiter.acquire(self._agent, n)

    def __enter__(self) -> Self:
        self._limiter.open_stream(self._agent)
        return self

    def __exit__(self, *exc: object) -> None:
        self._limiter.close_stream(self._agent)


def schedule_from_config(
    upstream: int, egress: int, per_agent: int, entries: Iterable[ScheduleEntry]
) -> RateSchedule:
    """Build a :class:`RateSchedule` from ``[limits]`` values (``ScheduleEntry`` objects).

    Raises:
        ValueError: a malformed entry.
    """
    windows = [
        Window.parse(
            e.start, e.end, e.days, upstream=e.upstream, egress=e.egress, per_agent=e.per_agent
        )
        for e in entries
    ]
    return RateSchedule(Rates(upstream, egress, per_agent), tuple(windows))


__all__ = [
    "MAX_GAP",
    "BandwidthLimiter",
    "Pacer",
    "RateSchedule",
    "Rates",
    "TokenBucket",
    "Window",
    "chunk_size",
    "jain_index",
    "schedule_from_config",
]

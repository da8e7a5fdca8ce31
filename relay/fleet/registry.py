"""The agent registry: who checked in, what they run, what they were offered, how it went.

Rules:

* Records live in the relay's state store (diskcache) and in memory; reads are
  served from memory. One writer task saves them (:meth:`Registry.save` only
  marks a record dirty): each batch of dirty records, and the stored records of
  evicted agents, is written in one transaction in one thread, while the next
  batch accumulates (group commit).
* A change of substance (a new agent, its group, deferral or installed
  versions, what it is offered, its first-offer times, its report events) is
  durable before :meth:`Registry.save` returns: the caller awaits the commit of
  its batch and gets its :class:`relay.errors.StateUnavailableError`. A check-in
  that only moves ``last_seen``, the address or the time of an unchanged offer
  does not wait: it is written with the next batch, at most
  :data:`FLUSH_INTERVAL` later, so a crash loses at most that much of it.
  While the store refuses writes (damaged, disk full) every save waits, so the
  caller learns it as before.
* An agent is keyed by its ``agent_id`` (the ``Relay-Agent-Id`` it sends).
* Bounded: at most ``max_agents`` records; a new agent past that evicts the one
  seen longest ago, and agents not seen for ``idle_expiry`` seconds are dropped
  (each counted through ``on_evicted`` with ``"cap"`` or ``"idle"``). Records are
  kept in the order they were last seen, so both cost O(1) per check-in.
* Nothing on the event loop walks the records: the groups are a counter kept on
  every change (:meth:`Registry.groups`, :meth:`Registry.group_counts`), the ids
  a sorted list kept by insertion (:meth:`Registry.page`), the fleet report and
  its counts are computed in a thread (:meth:`Registry.summary`,
  :meth:`Registry.rows_sync`). Records are changed by replacing their values
  (tuples and frozen values, never mutated in place), so a thread reading one
  sees either the old value or the new one.
* The registry keeps, per agent, when each (product, version) was first offered:
  on-demand deadlines count from that moment (docs/PROTOCOL.md).
* It keeps each agent's newest :data:`EVENTS_KEPT` report events (newest first),
  what it was last offered per product (:class:`relay.core.fleet.LastOffer`),
  and its installed versions, updated by check-ins and by ``installed`` reports
  as they arrive. Records are compact: slots, tuples, interned names; offers,
  events and kept rows are tuples of strings and numbers, which the cyclic
  garbage collector stops tracking (one tracked object per agent: its full
  passes stay short at 50,000 agents).
* States are derived on reading (:func:`relay.core.fleet.derive_state`), never
  stored: they depend on the time (an on-demand deadline passes). The report rows
  of an agent are kept until its record changes or one of its on-demand
  deadlines passes, so a scrape or a report costs little per agent.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import datetime as dt
import gc
import logging
import math
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from relay.core.fleet import (
    FleetState,
    LastOffer,
    ReportRow,
    VersionCount,
    derive_state,
    parse_time,
    version_table,
    worst_state,
)
from relay.core.policy import Action, RolloutMode
from relay.core.protocol import Event, ReportEvent, Via, rfc3339
from relay.errors import StateUnavailableError
from relay.storage.kv import KV

logger = logging.getLogger(__name__)

_PREFIX = "agent:"
EVENTS_KEPT = 20
"""Report events kept per agent (the newest)."""
MAX_AGENTS = 100_000
"""Agent records kept at most (the default of ``limits.max_agents``)."""
IDLE_EXPIRY = 90 * 86400.0
"""Seconds after which an agent not seen is forgotten (``limits.agent_expiry``)."""
FLUSH_INTERVAL = 1.0
"""Seconds a change without substance (``last_seen``, address) may wait to be written."""
SUMMARY_MAX_AGE = 5.0
"""Seconds a fleet summary is reused while no record changed (deadlines pass meanwhile)."""
_FAILURE_LOG_EVERY = 60.0

Installed = tuple[str, str, str]
"""A product an agent has: (product, version, sha256)."""


def _s(value: object) -> str:
    """``value`` as an interned string (names repeat across agents: keep one copy)."""
    return sys.intern(str(value))


def _installed_item(item: Mapping[str, Any]) -> Installed:
    return (
        _s(item.get("product", "")),
        _s(item.get("version", "")),
        _s(item.get("sha256", "")),
    )


# Offers, events and kept rows are held as tuples of strings and numbers (no enums, no
# objects): once the cyclic garbage collector has seen such a tuple it stops tracking it,
# so its full passes do not walk every agent's values (only the records themselves).
_Offer = tuple[str, str, str, str, str | None, str]
"""(action, version, sha256, mode, deadline, at): a :class:`LastOffer`."""
_Event = tuple[str, str, str, str, str, int, str, str, str]
"""(product, from_version, to_version, event, via, bytes, reason, message, at)."""
_Row = tuple[str, str, str, str, str, str, str, str, str, str, str, str]
"""A :class:`ReportRow`'s fields, the state as its value."""
_KeptRows = tuple[int, float, float, tuple[_Row, ...], str]
"""(revision, computed at, valid until, rows, worst state)."""


def _offer(raw: Mapping[str, Any] | LastOffer) -> _Offer | None:
    if isinstance(raw, LastOffer):
        offer = raw
    else:
        try:
            offer = LastOffer.from_dict(raw)
        except ValueError:
            return None
    return (
        _s(offer.action.value),
        _s(offer.version),
        _s(offer.sha256),
        _s(offer.mode.value),
        offer.deadline,
        offer.at,
    )


def _last_offer(offer: _Offer) -> LastOffer:
    return LastOffer(Action(offer[0]), offer[1], offer[2], RolloutMode(offer[3]), *offer[4:])


def _event(raw: Mapping[str, Any] | ReportEvent) -> _Event | None:
    data: Mapping[str, Any] = raw.to_dict() if isinstance(raw, ReportEvent) else raw
    try:
        return (
            _s(data.get("product", "")),
            _s(data.get("from_version", "")),
            _s(data.get("to_version", "")),
            _s(Event(str(data.get("event", ""))).value),
            _s(Via(str(data.get("via", Via.FULL))).value),
            int(data.get("bytes", 0) or 0),
            _s(data.get("reason", "")),
            str(data.get("message", "")),
            str(data.get("at", "")),
        )
    except (TypeError, ValueError):
        return None


_EVENT_FIELDS = (
    "product",
    "from_version",
    "to_version",
    "event",
    "via",
    "bytes",
    "reason",
    "message",
    "at",
)


def _event_dict(event: _Event | None) -> dict[str, Any] | None:
    """The JSON form (:meth:`ReportEvent.to_dict`)."""
    return None if event is None else dict(zip(_EVENT_FIELDS, event, strict=True))


def _offer_substance(offered: tuple[tuple[str, _Offer], ...]) -> tuple[object, ...]:
    # What an offer means; its ``at`` (when it was last answered) is no substance.
    return tuple((p, o[:5]) for p, o in offered)


def _pack_row(row: ReportRow) -> _Row:
    return (
        row.agent_id,
        row.group,
        row.product,
        row.installed_version,
        row.offered_version,
        _s(row.state.value),
        row.reason,
        row.message,
        row.last_event,
        row.last_event_at,
        row.last_seen,
        row.address,
    )


def _row(f: _Row) -> ReportRow:
    return ReportRow(f[0], f[1], f[2], f[3], f[4], FleetState(f[5]), *f[6:])


class AgentRecord:
    """What the relay knows of one agent.

    Compact: slots, tuples of interned strings and numbers. Every change
    replaces a value (never mutates one in place) and moves :attr:`rev`, so the
    report rows kept for the record are recomputed and a thread reading it sees
    whole values. The list and dict properties are the JSON forms (copies).
    """

    __slots__ = (
        "_events",
        "_first_offered",
        "_installed",
        "_offered",
        "_rows",
        "address",
        "agent_id",
        "defer_days",
        "failures",
        "first_seen",
        "group",
        "last_seen",
        "rev",
    )

    def __init__(
        self,
        agent_id: str,
        *,
        group: str = "default",
        address: str = "",
        first_seen: float = 0.0,
        last_seen: float = 0.0,
        defer_days: int = 0,
        failures: int = 0,
        installed: Iterable[Mapping[str, Any]] = (),
        first_offered: Mapping[str, float] | None = None,
        offered: Mapping[str, Mapping[str, Any] | LastOffer] | None = None,
        events: Iterable[Mapping[str, Any] | ReportEvent] = (),
    ) -> None:
        self.agent_id = agent_id
        self.group = _s(group)
        self.address = _s(address)
        self.first_seen = first_seen
        self.last_seen = last_seen
        self.defer_days = defer_days
        self.failures = failures
        self._installed: tuple[Installed, ...] = ()
        self._first_offered: tuple[tuple[str, float], ...] = ()
        self._offered: tuple[tuple[str, _Offer], ...] = ()
        self._events: tuple[_Event, ...] = ()  # newest first
        self.rev = 0
        self.installed = installed
        self.first_offered = first_offered or {}
        self.offered = offered or {}
        self.events = events
        self.rev = 0
        # (rev, computed at, valid until, rows, worst state)
        self._rows: _KeptRows | None = None

    def __repr__(self) -> str:
        return f"AgentRecord({self.agent_id!r}, group={self.group!r})"

    # -- JSON forms ------------------------------------------------------------

    @property
    def installed(self) -> list[dict[str, str]]:
        """Installed products (``product``, ``version``, ``sha256``)."""
        return [{"product": p, "version": v, "sha256": s} for p, v, s in self._installed]

    @installed.setter
    def installed(self, items: Iterable[Mapping[str, Any]]) -> None:
        self._installed = tuple(_installed_item(i) for i in items)
        self.rev += 1

    @property
    def first_offered(self) -> dict[str, float]:
        """``"product@version"`` -> when it was first offered (seconds since the epoch)."""
        return dict(self._first_offered)

    @first_offered.setter
    def first_offered(self, times: Mapping[str, float]) -> None:
        self._first_offered = tuple((_s(k), float(v)) for k, v in times.items())
        self.rev += 1

    @property
    def offered(self) -> dict[str, dict[str, Any]]:
        """Product -> what the relay last offered (:meth:`LastOffer.to_dict`)."""
        return {p: _last_offer(o).to_dict() for p, o in self._offered}

    @offered.setter
    def offered(self, offers: Mapping[str, Mapping[str, Any] | LastOffer]) -> None:
        self._offered = tuple(
            (_s(p), o) for p, raw in offers.items() if (o := _offer(raw)) is not None
        )
        self.rev += 1

    @property
    def events(self) -> list[dict[str, Any]]:
        """The newest report events, newest first."""
        return [d for e in self._events if (d := _event_dict(e)) is not None]

    @events.setter
    def events(self, events: Iterable[Mapping[str, Any] | ReportEvent]) -> None:
        self._events = tuple(e for raw in events if (e := _event(raw)) is not None)[:EVENTS_KEPT]
        self.rev += 1

    @property
    def last_outcome(self) -> dict[str, Any] | None:
        """The newest report event."""
        return _event_dict(self._events[0] if self._events else None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (what is stored)."""
        return {
            "agent_id": self.agent_id,
            "group": self.group,
            "address": self.address,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
            "installed": self.installed,
            "first_offered": self.first_offered,
            "defer_days": self.defer_days,
            "last_outcome": self.last_outcome,
            "failures": self.failures,
            "events": self.events,
            "offered": self.offered,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AgentRecord:
        """Inverse of :meth:`to_dict` (unknown keys and unreadable values are dropped).

        Raises:
            ValueError: no ``agent_id``.
            TypeError: a value of the wrong type.
        """
        agent_id = data.get("agent_id")
        if not isinstance(agent_id, str) or not agent_id:
            raise ValueError("agent_id: expected a non-empty string")
        return cls(
            agent_id,
            group=str(data.get("group", "default")),
            address=str(data.get("address", "")),
            first_seen=float(data.get("first_seen", 0.0)),
            last_seen=float(data.get("last_seen", 0.0)),
            defer_days=int(data.get("defer_days", 0)),
            failures=int(data.get("failures", 0)),
            installed=data.get("installed") or (),
            first_offered=data.get("first_offered") or {},
            offered=data.get("offered") or {},
            events=data.get("events") or (),
        )

    # -- reading ---------------------------------------------------------------

    def version_of(self, product: str) -> str | None:
        """The installed version of ``product``, if any."""
        for p, version, _sha in self._installed:
            if p == product:
                return version
        return None

    def installed_versions(self) -> tuple[Installed, ...]:
        """Installed products as ``(product, version, sha256)``."""
        return self._installed

    def first_offered_items(self) -> tuple[tuple[str, float], ...]:
        """``("product@version", time)`` pairs."""
        return self._first_offered

    def offer_of(self, product: str) -> LastOffer | None:
        """What the relay last offered for ``product`` (``None``: never, or unreadable)."""
        for p, offer in self._offered:
            if p == product:
                return _last_offer(offer)
        return None

    def rows_change_at(self) -> float:
        """When the derived states may change without a new write: the next deadline."""
        deadlines = [
            when.timestamp()
            for _p, offer in self._offered
            if (when := parse_time(offer[4])) is not None
        ]
        return min(deadlines, default=math.inf)

    def rows(self, now: dt.datetime) -> list[ReportRow]:
        """One report row per product the agent has, was offered or reported on."""
        newest: dict[str, _Event] = {}
        for event in self._events:
            newest.setdefault(event[0], event)
        products = {p for p, _v, _s in self._installed}
        products |= {p for p, _o in self._offered} | {p for p in newest if p}
        latest = self._events[0] if self._events else None
        if latest is not None and not latest[0] and latest[3] == Event.FAILED:
            products.add("")
        last_seen = rfc3339(self.last_seen) if self.last_seen else ""
        out = []
        for product in sorted(products):
            installed = self.version_of(product)
            offer = self.offer_of(product)
            last = newest.get(product)
            standing = derive_state(
                installed=installed,
                offer=offer,
                last_event=_event_dict(last),
                defer_days=self.defer_days,
                now=now,
            )
            out.append(
                ReportRow(
                    agent_id=self.agent_id,
                    group=self.group,
                    product=product,
                    installed_version=installed or "",
                    offered_version=offer.version if offer is not None else "",
                    state=standing.state,
                    reason=standing.reason,
                    message=standing.message,
                    last_event=last[3] if last else "",
                    last_event_at=last[8] if last else "",
                    last_seen=last_seen or "",
                    address=self.address,
                )
            )
        return out

    def cached_rows(self, now: dt.datetime) -> tuple[list[ReportRow], FleetState]:
        """:meth:`rows` and their worst state, kept until the record changes or a deadline passes.

        Safe from a thread while the loop changes the record (the record's
        revision is read first: a change meanwhile makes the kept rows stale).
        """
        at = now.timestamp()
        kept = self._rows
        rev = self.rev
        if kept is None or kept[0] != rev or not kept[1] <= at < kept[2]:
            rows = self.rows(now)
            worst = worst_state(rows)
            packed = tuple(_pack_row(r) for r in rows)
            self._rows = (rev, at, self.rows_change_at(), packed, _s(worst.value))
            return rows, worst
        return [_row(f) for f in kept[3]], FleetState(kept[4])

    def worst_state(self, now: dt.datetime) -> FleetState:
        """The worst state of the agent's products (kept as :meth:`cached_rows`)."""
        kept = self._rows
        at = now.timestamp()
        if kept is not None and kept[0] == self.rev and kept[1] <= at < kept[2]:
            return FleetState(kept[4])
        return self.cached_rows(now)[1]

    # -- changes ---------------------------------------------------------------

    def add_event(self, event: ReportEvent) -> None:
        """Record one report event: newest first, bounded; it updates the versions installed."""
        stored = _event(event)
        if stored is None:
            return
        self._events = (stored, *self._events[: EVENTS_KEPT - 1])
        if event.event is Event.FAILED:
            self.failures += 1
        elif event.event is Event.INSTALLED and event.product and event.to_version:
            offer = self.offer_of(event.product)
            sha = offer.sha256 if offer is not None and offer.version == event.to_version else ""
            kept = tuple(i for i in self._installed if i[0] != event.product)
            self._installed = (*kept, (_s(event.product), _s(event.to_version), _s(sha)))
        elif event.event is Event.UNINSTALLED and event.product:
            self._installed = tuple(i for i in self._installed if i[0] != event.product)
        self.rev += 1


@dataclass(frozen=True, slots=True)
class FleetSummary:
    """Counts over every agent, computed in a thread (:meth:`Registry.summary`).

    Attributes:
        at: when it was computed (seconds since the epoch).
        agents: agents counted.
        states: agents by their worst state (every state present).
        versions: agents per product, version and group (:func:`version_table`).
        installed: agents per installed (product, version).
    """

    at: float
    agents: int
    states: Mapping[FleetState, int]
    versions: tuple[VersionCount, ...]
    installed: Mapping[tuple[str, str], int]
    changes: int = 0


class Registry:
    """Agent records in memory, persisted in the state store by one writer task.

    Args:
        kv: the state store.
        max_agents: records kept at most.
        idle_expiry: seconds after which an agent not seen is dropped (0: never).
        flush_interval: seconds a change without substance may wait to be written.
    """

    def __init__(
        self,
        kv: KV,
        *,
        max_agents: int = MAX_AGENTS,
        idle_expiry: float = IDLE_EXPIRY,
        flush_interval: float = FLUSH_INTERVAL,
    ) -> None:
        self._kv = kv
        self.max_agents = max_agents
        self.idle_expiry = idle_expiry
        self.flush_interval = flush_interval
        self.on_evicted: Callable[[str], None] | None = None
        # Least recently seen first: the next to evict.
        self._agents: OrderedDict[str, AgentRecord] = OrderedDict()
        self._ids: list[str] = []  # every id, sorted (pages of the agent list)
        self._groups: Counter[str] = Counter()
        self._changes = 0  # moves on every change (the summary is kept until it does)
        # The next batch of the writer.
        self._dirty: dict[str, AgentRecord] = {}
        self._urgent: set[str] = set()  # dirty ids whose next save waits for the commit
        self._evicted: set[str] = set()  # ids whose stored records the next batch deletes
        self._commit: asyncio.Future[None] | None = None  # the next batch's commit
        self._wake: asyncio.Event | None = None
        self._hurry: asyncio.Event | None = None
        self._writer: asyncio.Task[None] | None = None
        self._failing = False  # the last batch failed: every save waits until one succeeds
        self._failure_logged = -math.inf
        self._summary: FleetSummary | None = None
        self._summary_lock = threading.Lock()

    # -- loading ---------------------------------------------------------------

    async def load(self) -> None:
        """Read every record from disk in one pass, in a thread.

        The newest ``max_agents`` by last seen are kept (the others are evicted
        and deleted with the first batch). The cyclic garbage collector is
        paused while the records are built (each of its full passes would walk
        them all, holding the interpreter: ~0.2 s at 50,000 agents), and the
        loaded records then move to its permanent generation (:func:`gc.freeze`:
        they live as long as the relay; reference counting still frees a
        record replaced or evicted, they hold no cycles).

        Raises:
            StateUnavailableError: the database cannot be read.
        """
        gc.collect()  # what the freeze below keeps: no garbage
        gc.disable()
        try:
            loaded, evicted = await asyncio.to_thread(self._load_sync, time.time())
        finally:
            gc.enable()
        gc.freeze()
        agents, ids, groups = loaded
        self._agents, self._ids, self._groups = agents, ids, groups
        self._changes += 1
        for gone, reason in evicted:
            self._evicted.add(gone)
            if self.on_evicted is not None:
                self.on_evicted(reason)

    def _load_sync(
        self, now: float
    ) -> tuple[
        tuple[OrderedDict[str, AgentRecord], list[str], Counter[str]], list[tuple[str, str]]
    ]:
        records = []
        for _key, value in self._kv.items_sync(_PREFIX):
            if isinstance(value, dict):
                with contextlib.suppress(AttributeError, TypeError, ValueError):
                    records.append(AgentRecord.from_dict(value))
        records.sort(key=lambda r: r.last_seen)
        over = max(len(records) - self.max_agents, 0)
        evicted = [(r.agent_id, "cap") for r in records[:over]]
        records = records[over:]
        if self.idle_expiry:
            fresh = bisect.bisect_left(records, now - self.idle_expiry, key=lambda r: r.last_seen)
            evicted += [(r.agent_id, "idle") for r in records[:fresh]]
            records = records[fresh:]
        agents = OrderedDict((r.agent_id, r) for r in records)
        return (agents, sorted(agents), Counter(r.group for r in records)), evicted

    # -- membership ------------------------------------------------------------

    def _add(self, record: AgentRecord) -> None:
        self._agents[record.agent_id] = record
        bisect.insort(self._ids, record.agent_id)
        self._groups[record.group] += 1
        self._evicted.discard(record.agent_id)

    def _set_group(self, record: AgentRecord, group: str) -> None:
        if record.group == group:
            return
        self._uncount(record.group)
        self._groups[group] += 1
        record.group = _s(group)
        record.rev += 1

    def _uncount(self, group: str) -> None:
        self._groups[group] -= 1
        if self._groups[group] <= 0:
            del self._groups[group]

    def _touch(self, record: AgentRecord, now: float) -> None:
        """``record`` was just seen: it goes last in eviction order; the bounds hold."""
        if record.agent_id not in self._agents:
            self._add(record)
        self._agents.move_to_end(record.agent_id)
        self._changes += 1
        self._bound(now)

    def _bound(self, now: float) -> None:
        while self._agents:
            oldest = next(iter(self._agents.values()))
            if len(self._agents) > self.max_agents:
                reason = "cap"
            elif self.idle_expiry and oldest.last_seen < now - self.idle_expiry:
                reason = "idle"
            else:
                return
            self._drop(oldest)
            if self.on_evicted is not None:
                self.on_evicted(reason)

    def _drop(self, record: AgentRecord) -> None:
        agent_id = record.agent_id
        del self._agents[agent_id]
        at = bisect.bisect_left(self._ids, agent_id)
        if at < len(self._ids) and self._ids[at] == agent_id:
            del self._ids[at]
        self._uncount(record.group)
        self._dirty.pop(agent_id, None)
        self._urgent.discard(agent_id)
        self._evicted.add(agent_id)
        self._changes += 1

    def get(self, agent_id: str) -> AgentRecord | None:
        """The record of ``agent_id``."""
        return self._agents.get(agent_id)

    def all(self) -> list[AgentRecord]:
        """Every record, sorted by id (walks every record: from a thread, or in tests)."""
        agents = self._agents
        return [r for i in list(self._ids) if (r := agents.get(i)) is not None]

    def page(self, after: str | None, limit: int) -> list[AgentRecord]:
        """At most ``limit`` records by id, the first after ``after`` (``None``: from the start).

        O(log n + limit): a bisection of the sorted ids.
        """
        ids = self._ids
        start = bisect.bisect_right(ids, after) if after is not None else 0
        agents = self._agents
        return [agents[i] for i in ids[start : start + limit]]

    def groups(self) -> set[str]:
        """The groups agents checked in with (O(groups): a counter kept on every change)."""
        return set(self._groups)

    def group_counts(self) -> dict[str, int]:
        """Agents per group (O(groups))."""
        return dict(self._groups)

    def __len__(self) -> int:
        return len(self._agents)

    # -- changes ---------------------------------------------------------------

    def _changed(self, record: AgentRecord, *, substance: bool) -> None:
        self._dirty[record.agent_id] = record
        if substance:
            self._urgent.add(record.agent_id)
        self._changes += 1

    def checkin(
        self,
        agent_id: str,
        *,
        group: str,
        address: str,
        installed: list[dict[str, str]],
        defer_days: int,
        now: float | None = None,
    ) -> AgentRecord:
        """Update the in-memory record of a check-in (call :meth:`save` after)."""
        now = time.time() if now is None else now
        record = self._agents.get(agent_id)
        substance = record is None
        if record is None:
            record = AgentRecord(agent_id, group=group, first_seen=now)
        elif record.group != group:
            self._set_group(record, group)
            substance = True
        items = tuple(_installed_item(i) for i in installed)
        if items != record.installed_versions():
            record.installed = installed
            substance = True
        if record.defer_days != defer_days:
            record.defer_days = defer_days
            substance = True
        record.address = _s(address)
        record.last_seen = now
        record.rev += 1
        self._touch(record, now)
        self._changed(record, substance=substance)
        return record

    def set_offers(
        self,
        record: AgentRecord,
        offered: Mapping[str, LastOffer],
        first_offered: Mapping[str, float],
    ) -> None:
        """Record what a check-in answered ``record``'s agent, and new first-offer times.

        A change in what is offered (not only when) or a new first-offer time is
        substance: the next :meth:`save` waits for its commit.
        """
        before = _offer_substance(record._offered)  # noqa: SLF001 - the registry owns records
        record.offered = offered
        substance = _offer_substance(record._offered) != before  # noqa: SLF001
        if first_offered:
            times = record.first_offered
            new = {k: v for k, v in first_offered.items() if k not in times}
            if new:
                record.first_offered = {**times, **new}
                substance = True
        self._changed(record, substance=substance)

    def report(
        self,
        agent_id: str,
        events: Iterable[ReportEvent],
        *,
        address: str,
        now: float | None = None,
    ) -> AgentRecord:
        """Update the in-memory record with report events (call :meth:`save` after)."""
        now = time.time() if now is None else now
        record = self._agents.get(agent_id) or AgentRecord(
            agent_id, first_seen=now, address=address
        )
        for event in events:
            record.add_event(event)
        record.last_seen = now
        record.rev += 1
        self._touch(record, now)
        self._changed(record, substance=True)
        return record

    # -- the writer ------------------------------------------------------------

    async def save(self, record: AgentRecord) -> None:
        """Have ``record`` written; wait for the commit when it changed in substance.

        Changes without substance are written with the next batch, at most
        :attr:`flush_interval` later (see the module's rules).

        Raises:
            StateUnavailableError: it could not be saved (its batch failed).
        """
        agent_id = record.agent_id
        if agent_id not in self._agents:
            self._touch(record, time.time())
            self._urgent.add(agent_id)
        self._dirty[agent_id] = record
        wait = agent_id in self._urgent or self._failing or bool(self._kv.damaged)
        self._urgent.discard(agent_id)
        self._start()
        if not wait:
            self._poke(hurry=False)
            return
        await self._next_commit()

    async def flush(self) -> None:
        """Write every pending change now and wait for it.

        Raises:
            StateUnavailableError: the batch failed.
        """
        if not (self._dirty or self._evicted):
            return
        self._start()
        await self._next_commit()

    async def _next_commit(self) -> None:
        """Have the next batch written now and wait for its commit (shared by its callers)."""
        if self._commit is None:
            self._commit = asyncio.get_running_loop().create_future()
            self._commit.add_done_callback(_retrieve)
        commit = self._commit
        self._poke(hurry=True)
        await asyncio.shield(commit)

    async def close(self) -> None:
        """Write what is pending (a failure is logged) and stop the writer."""
        try:
            if not self._kv.damaged:  # said once at start; nothing can be written
                await self.flush()
        except StateUnavailableError as e:
            logger.warning("agent records not saved at shutdown: %s", e)
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None

    def _start(self) -> None:
        if self._writer is None or self._writer.done():
            self._wake = asyncio.Event()
            self._hurry = asyncio.Event()
            self._writer = asyncio.create_task(self._write_loop(), name="registry-writer")

    def _poke(self, *, hurry: bool) -> None:
        if self._wake is not None:
            self._wake.set()
        if hurry and self._hurry is not None:
            self._hurry.set()

    async def _write_loop(self) -> None:
        wake, hurry = self._wake, self._hurry
        if wake is None or hurry is None:  # set by _start
            return
        while True:
            await wake.wait()
            wake.clear()
            if self._commit is None:  # nobody waits: let changes gather for an interval
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(hurry.wait(), self.flush_interval)
            hurry.clear()
            await self._write_batch()  # a failed batch is retried with the next save

    async def _write_batch(self) -> None:
        dirty, self._dirty = self._dirty, {}
        gone, self._evicted = self._evicted, set()
        commit, self._commit = self._commit, None
        if self._kv.damaged and commit is None:
            return  # nothing can be written and nobody waits to hear it
        try:
            if dirty or gone:
                await asyncio.to_thread(self._write_sync, list(dirty.values()), sorted(gone))
        except Exception as error:  # the writer goes on; the records wait for the next batch
            e = error if isinstance(error, StateUnavailableError) else None
            if e is None:
                logger.exception("agent records: unexpected failure of a batch")
                e = StateUnavailableError(f"agent records not saved: {error!r}")
            self._failing = True
            if not self._kv.damaged:  # kept for the next batch (unless newer or gone)
                for agent_id, record in dirty.items():
                    if agent_id in self._agents:
                        self._dirty.setdefault(agent_id, record)
                self._evicted |= {g for g in gone if g not in self._agents}
            if commit is not None:
                commit.set_exception(e)
            elif time.monotonic() - self._failure_logged >= _FAILURE_LOG_EVERY:
                self._failure_logged = time.monotonic()
                logger.warning("agent records not saved yet (retried with the next save): %s", e)
            return
        except BaseException:  # cancelled: the relay stops
            if commit is not None and not commit.done():
                commit.set_exception(StateUnavailableError("agent records not saved: stopping"))
            raise
        self._failing = False
        if commit is not None:
            commit.set_result(None)

    def _write_sync(self, records: list[AgentRecord], gone: list[str]) -> None:
        self._kv.write_many_sync(
            {_PREFIX + r.agent_id: r.to_dict() for r in records},
            [_PREFIX + g for g in gone],
        )

    # -- the fleet report (from a thread) ----------------------------------------

    def _snapshot(self) -> Iterator[AgentRecord]:
        """Every record by id; safe from a thread (the id list is copied at once)."""
        agents = self._agents
        for agent_id in list(self._ids):
            record = agents.get(agent_id)
            if record is not None:
                yield record

    def rows_sync(
        self, now: dt.datetime | None = None, *, after: str | None = None
    ) -> Iterator[ReportRow]:
        """The fleet report: every agent's rows, by agent id then product.

        Walks every record: call it from a thread.

        Args:
            now: the time the states are derived at (default: now).
            after: start after this agent id.
        """
        now = now or dt.datetime.now(dt.UTC)
        records = self._snapshot()
        if after is not None:
            start = bisect.bisect_right(self._ids, after)
            agents = self._agents
            records = (r for i in self._ids[start:] if (r := agents.get(i)) is not None)
        for record in records:
            yield from record.cached_rows(now)[0]

    def rows(self, now: dt.datetime | None = None) -> list[ReportRow]:
        """Every report row (:meth:`rows_sync` as a list; from a thread, or in tests)."""
        return list(self.rows_sync(now))

    def rows_of(self, record: AgentRecord, now: dt.datetime) -> list[ReportRow]:
        """One agent's report rows (kept until its record changes or a deadline passes)."""
        return list(record.cached_rows(now)[0])

    def summary_sync(self, now: dt.datetime | None = None) -> FleetSummary:
        """Counts over every agent: kept while no record changed, at most :data:`SUMMARY_MAX_AGE`.

        States depend on the time (on-demand deadlines), so a summary is computed
        again after :data:`SUMMARY_MAX_AGE` seconds even when nothing changed: a
        count may lag a passing deadline by that much. Walks every record: call
        it from a thread.
        """
        now = now or dt.datetime.now(dt.UTC)
        at = now.timestamp()
        with self._summary_lock:
            changes = self._changes
            kept = self._summary
            if kept is not None and kept.changes == changes and 0 <= at - kept.at < SUMMARY_MAX_AGE:
                return kept
            states = dict.fromkeys(FleetState, 0)
            installed: Counter[tuple[str, str]] = Counter()
            rows: list[ReportRow] = []
            agents = 0
            for record in self._snapshot():
                record_rows, worst = record.cached_rows(now)
                states[worst] += 1
                rows.extend(record_rows)
                installed.update((p, v) for p, v, _s in record.installed_versions())
                agents += 1
            self._summary = FleetSummary(
                at, agents, states, tuple(version_table(rows)), installed, changes
            )
            return self._summary

    async def summary(self) -> FleetSummary:
        """:meth:`summary_sync` in a thread."""
        return await asyncio.to_thread(self.summary_sync)


def _retrieve(future: asyncio.Future[None]) -> None:
    # A commit nobody awaits any more (its callers left) must not log an unread error.
    if not future.cancelled():
        future.exception()

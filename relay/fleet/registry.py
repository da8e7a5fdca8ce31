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
  as they arrive. Each agent is held as one tuple of strings, numbers and
  tuples (interned names), which the cyclic garbage collector stops tracking
  after its first pass: its full passes do not walk the agents, so they stay
  short however many there are. :class:`AgentRecord` is a view made on reading.
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
import itertools
import logging
import math
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

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


_Values = tuple[
    str,  # agent_id
    str,  # group
    str,  # address
    float,  # first_seen
    float,  # last_seen
    int,  # defer_days
    int,  # failures
    tuple[Installed, ...],  # installed
    tuple[tuple[str, float], ...],  # first offered: ("product@version", time)
    tuple[tuple[str, _Offer], ...],  # offered: (product, offer)
    tuple[_Event, ...],  # events, newest first
    int,  # revision
    int,  # born: its first revision (tells an agent seen again from the one evicted)
]
"""One agent's record as the registry holds it: a tuple of strings, numbers and tuples."""
# Where each value is in a _Values tuple.
_ID: Final = 0
_GROUP: Final = 1
_ADDRESS: Final = 2
_FIRST_SEEN: Final = 3
_LAST_SEEN: Final = 4
_DEFER_DAYS: Final = 5
_FAILURES: Final = 6
_INSTALLED: Final = 7
_FIRST_OFFERED: Final = 8
_OFFERED: Final = 9
_EVENTS: Final = 10
_REV: Final = 11
_BORN: Final = 12
_REVISIONS = itertools.count(1)  # unique across records: kept rows are matched by it


def _first_offered_items(times: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple((_s(k), float(v)) for k, v in times.items())


def _offer_items(
    offers: Mapping[str, Mapping[str, Any] | LastOffer],
) -> tuple[tuple[str, _Offer], ...]:
    return tuple((_s(p), o) for p, raw in offers.items() if (o := _offer(raw)) is not None)


def _event_items(events: Iterable[Mapping[str, Any] | ReportEvent]) -> tuple[_Event, ...]:
    return tuple(e for raw in events if (e := _event(raw)) is not None)[:EVENTS_KEPT]


def _version_in(v: _Values, product: str) -> str | None:
    for p, version, _sha in v[_INSTALLED]:
        if p == product:
            return version
    return None


def _offer_in(v: _Values, product: str) -> LastOffer | None:
    for p, offer in v[_OFFERED]:
        if p == product:
            return _last_offer(offer)
    return None


def _to_dict(v: _Values) -> dict[str, Any]:
    """The JSON form of a record (what is stored)."""
    return {
        "agent_id": v[_ID],
        "group": v[_GROUP],
        "address": v[_ADDRESS],
        "first_seen": v[_FIRST_SEEN],
        "last_seen": v[_LAST_SEEN],
        "installed": [{"product": p, "version": n, "sha256": s} for p, n, s in v[_INSTALLED]],
        "first_offered": dict(v[_FIRST_OFFERED]),
        "defer_days": v[_DEFER_DAYS],
        "last_outcome": _event_dict(v[_EVENTS][0] if v[_EVENTS] else None),
        "failures": v[_FAILURES],
        "events": [d for e in v[_EVENTS] if (d := _event_dict(e)) is not None],
        "offered": {p: _last_offer(o).to_dict() for p, o in v[_OFFERED]},
    }


def _rows_change_at(v: _Values) -> float:
    """When the derived states may change without a new write: the next deadline."""
    deadlines = [
        when.timestamp() for _p, offer in v[_OFFERED] if (when := parse_time(offer[4])) is not None
    ]
    return min(deadlines, default=math.inf)


def _report_rows(v: _Values, now: dt.datetime) -> list[ReportRow]:
    """One report row per product the agent has, was offered or reported on."""
    events = v[_EVENTS]
    newest: dict[str, _Event] = {}
    for event in events:
        newest.setdefault(event[0], event)
    products = {p for p, _v, _s in v[_INSTALLED]}
    products |= {p for p, _o in v[_OFFERED]} | {p for p in newest if p}
    latest = events[0] if events else None
    if latest is not None and not latest[0] and latest[3] == Event.FAILED:
        products.add("")
    last_seen = rfc3339(v[_LAST_SEEN]) if v[_LAST_SEEN] else ""
    out = []
    for product in sorted(products):
        installed = _version_in(v, product)
        offer = _offer_in(v, product)
        last = newest.get(product)
        standing = derive_state(
            installed=installed,
            offer=offer,
            last_event=_event_dict(last),
            defer_days=v[_DEFER_DAYS],
            now=now,
        )
        out.append(
            ReportRow(
                agent_id=v[_ID],
                group=v[_GROUP],
                product=product,
                installed_version=installed or "",
                offered_version=offer.version if offer is not None else "",
                state=standing.state,
                reason=standing.reason,
                message=standing.message,
                last_event=last[3] if last else "",
                last_event_at=last[8] if last else "",
                last_seen=last_seen or "",
                address=v[_ADDRESS],
            )
        )
    return out


class AgentRecord:
    """What the relay knows of one agent: a view of the values the registry holds.

    The registry keeps each agent as one tuple of strings, numbers and tuples
    (:data:`_Values`), which the cyclic garbage collector stops tracking after
    its first pass: its full passes do not walk the agents, however many. A
    record is made on reading (:meth:`Registry.get`, :meth:`Registry.page`);
    it reads the registry's newest values, and each change replaces them (never
    mutates a value in place) with a new revision, so a thread reading a record
    sees either the old values or the new ones, and the report rows kept for an
    agent are recomputed after any change. A record not (or no longer) in a
    registry holds its values itself. The list and dict properties are the JSON
    forms (copies).
    """

    __slots__ = ("_home", "_kept", "_v")

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
        self._home: Registry | None = None
        self._kept: _KeptRows | None = None  # the rows of a record outside a registry
        rev = next(_REVISIONS)
        self._v: _Values = (
            agent_id,
            _s(group),
            _s(address),
            float(first_seen),
            float(last_seen),
            int(defer_days),
            int(failures),
            tuple(_installed_item(i) for i in installed),
            _first_offered_items(first_offered or {}),
            _offer_items(offered or {}),
            _event_items(events),
            rev,
            rev,
        )

    @classmethod
    def _view(cls, home: Registry, values: _Values) -> AgentRecord:
        record = cls.__new__(cls)
        record._home = home  # noqa: SLF001 - a record of this class
        record._kept = None  # noqa: SLF001
        record._v = values  # noqa: SLF001
        return record

    def _stored(self) -> _Values | None:
        """The registry's values of this record, while it holds them (``None``: evicted).

        An agent evicted then seen again is another record (another ``born``): a
        view of the evicted one neither reads nor writes it.
        """
        home = self._home
        if home is None:
            return None
        stored = home._agents.get(self._v[_ID])  # noqa: SLF001 - the registry's own records
        return stored if stored is not None and stored[_BORN] == self._v[_BORN] else None

    def _current(self) -> _Values:
        """The newest values: the registry's while it holds the agent, else the record's."""
        stored = self._stored()
        if stored is not None:
            self._v = stored
        return self._v

    def _update(self, changes: Mapping[int, object]) -> None:
        """Replace some values (by index) and the revision; the registry holds the new ones."""
        stored = self._stored()  # one look-up: which values, and whether to write back
        values: list[object] = list(self._v if stored is None else stored)
        for index, value in changes.items():
            values[index] = value
        values[_REV] = next(_REVISIONS)
        new: _Values = tuple(values)  # type: ignore[assignment]
        self._v = new
        home = self._home
        if stored is not None and home is not None:
            home._agents[new[_ID]] = new  # noqa: SLF001 - its place in eviction order stays

    def __repr__(self) -> str:
        return f"AgentRecord({self.agent_id!r}, group={self.group!r})"

    # -- values ------------------------------------------------------------------

    @property
    def agent_id(self) -> str:
        """The agent's id (its ``Relay-Agent-Id``)."""
        return self._v[_ID]

    @property
    def group(self) -> str:
        """The group it checked in with (changed through :meth:`Registry.checkin`)."""
        return self._current()[_GROUP]

    @property
    def address(self) -> str:
        """The address it was last seen from."""
        return self._current()[_ADDRESS]

    @address.setter
    def address(self, value: str) -> None:
        self._update({_ADDRESS: _s(value)})

    @property
    def first_seen(self) -> float:
        """When it first checked in (seconds since the epoch)."""
        return self._current()[_FIRST_SEEN]

    @property
    def last_seen(self) -> float:
        """When it was last seen (seconds since the epoch)."""
        return self._current()[_LAST_SEEN]

    @last_seen.setter
    def last_seen(self, value: float) -> None:
        self._update({_LAST_SEEN: float(value)})

    @property
    def defer_days(self) -> int:
        """The deferral it chose (days)."""
        return self._current()[_DEFER_DAYS]

    @defer_days.setter
    def defer_days(self, value: int) -> None:
        self._update({_DEFER_DAYS: int(value)})

    @property
    def failures(self) -> int:
        """Failures it reported."""
        return self._current()[_FAILURES]

    @property
    def rev(self) -> int:
        """The revision of its values (unique: it moves on every change)."""
        return self._current()[_REV]

    # -- JSON forms ------------------------------------------------------------

    @property
    def installed(self) -> list[dict[str, str]]:
        """Installed products (``product``, ``version``, ``sha256``)."""
        return [{"product": p, "version": v, "sha256": s} for p, v, s in self.installed_versions()]

    @installed.setter
    def installed(self, items: Iterable[Mapping[str, Any]]) -> None:
        self._update({_INSTALLED: tuple(_installed_item(i) for i in items)})

    @property
    def first_offered(self) -> dict[str, float]:
        """``"product@version"`` -> when it was first offered (seconds since the epoch)."""
        return dict(self.first_offered_items())

    @first_offered.setter
    def first_offered(self, times: Mapping[str, float]) -> None:
        self._update({_FIRST_OFFERED: _first_offered_items(times)})

    @property
    def offered(self) -> dict[str, dict[str, Any]]:
        """Product -> what the relay last offered (:meth:`LastOffer.to_dict`)."""
        return {p: _last_offer(o).to_dict() for p, o in self._current()[_OFFERED]}

    @offered.setter
    def offered(self, offers: Mapping[str, Mapping[str, Any] | LastOffer]) -> None:
        self._update({_OFFERED: _offer_items(offers)})

    @property
    def events(self) -> list[dict[str, Any]]:
        """The newest report events, newest first."""
        return [d for e in self._current()[_EVENTS] if (d := _event_dict(e)) is not None]

    @events.setter
    def events(self, events: Iterable[Mapping[str, Any] | ReportEvent]) -> None:
        self._update({_EVENTS: _event_items(events)})

    @property
    def last_outcome(self) -> dict[str, Any] | None:
        """The newest report event."""
        events = self._current()[_EVENTS]
        return _event_dict(events[0] if events else None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (what is stored)."""
        return _to_dict(self._current())

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
        return _version_in(self._current(), product)

    def installed_versions(self) -> tuple[Installed, ...]:
        """Installed products as ``(product, version, sha256)``."""
        return self._current()[_INSTALLED]

    def first_offered_items(self) -> tuple[tuple[str, float], ...]:
        """``("product@version", time)`` pairs."""
        return self._current()[_FIRST_OFFERED]

    def offer_of(self, product: str) -> LastOffer | None:
        """What the relay last offered for ``product`` (``None``: never, or unreadable)."""
        return _offer_in(self._current(), product)

    def rows_change_at(self) -> float:
        """When the derived states may change without a new write: the next deadline."""
        return _rows_change_at(self._current())

    def rows(self, now: dt.datetime) -> list[ReportRow]:
        """One report row per product the agent has, was offered or reported on."""
        return _report_rows(self._current(), now)

    def cached_rows(self, now: dt.datetime) -> tuple[list[ReportRow], FleetState]:
        """:meth:`rows` and their worst state, kept until the record changes or a deadline passes.

        Safe from a thread while the loop changes the record: the rows are
        computed from one version of the values and kept under its revision.
        """
        v = self._current()
        at = now.timestamp()
        home = self._home
        kept = home._kept.get(v[_ID]) if home is not None else self._kept  # noqa: SLF001
        if kept is None or kept[0] != v[_REV] or not kept[1] <= at < kept[2]:
            rows = _report_rows(v, now)
            worst = worst_state(rows)
            packed = tuple(_pack_row(r) for r in rows)
            kept = (v[_REV], at, _rows_change_at(v), packed, _s(worst.value))
            if home is None:
                self._kept = kept
            elif self._stored() is not None:  # not for an agent dropped meanwhile
                home._kept[v[_ID]] = kept  # noqa: SLF001
                if v[_ID] not in home._agents:  # noqa: SLF001 - dropped by the loop meanwhile
                    home._kept.pop(v[_ID], None)  # noqa: SLF001
            return rows, worst
        return [_row(f) for f in kept[3]], FleetState(kept[4])

    def worst_state(self, now: dt.datetime) -> FleetState:
        """The worst state of the agent's products (kept as :meth:`cached_rows`)."""
        return self.cached_rows(now)[1]

    # -- changes ---------------------------------------------------------------

    def add_event(self, event: ReportEvent) -> None:
        """Record one report event: newest first, bounded; it updates the versions installed."""
        stored = _event(event)
        if stored is None:
            return
        v = self._current()
        changes: dict[int, object] = {_EVENTS: (stored, *v[_EVENTS][: EVENTS_KEPT - 1])}
        if event.event is Event.FAILED:
            changes[_FAILURES] = v[_FAILURES] + 1
        elif event.event is Event.INSTALLED and event.product and event.to_version:
            offer = _offer_in(v, event.product)
            sha = offer.sha256 if offer is not None and offer.version == event.to_version else ""
            kept = tuple(i for i in v[_INSTALLED] if i[0] != event.product)
            changes[_INSTALLED] = (*kept, (_s(event.product), _s(event.to_version), _s(sha)))
        elif event.event is Event.UNINSTALLED and event.product:
            changes[_INSTALLED] = tuple(i for i in v[_INSTALLED] if i[0] != event.product)
        self._update(changes)


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
        # Least recently seen first: the next to evict. Tuples only (see AgentRecord).
        self._agents: OrderedDict[str, _Values] = OrderedDict()
        self._kept: dict[str, _KeptRows] = {}  # report rows by agent (written by threads)
        self._ids: list[str] = []  # every id, sorted (pages of the agent list)
        self._groups: Counter[str] = Counter()
        self._changes = 0  # moves on every change (the summary is kept until it does)
        # The next batch of the writer.
        self._dirty: set[str] = set()
        self._urgent: set[str] = set()  # dirty ids whose next save waits for the commit
        self._evicted: set[str] = set()  # ids whose stored records the next batch deletes
        self._commit: asyncio.Future[None] | None = None  # the next batch's commit
        self._writing: asyncio.Future[None] | None = None  # the batch being written (done after)
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
        paused while the records are built (the relay freezes its start-up heap
        once everything is built: :func:`relay.server.compose.freeze_start_up_heap`).

        Raises:
            StateUnavailableError: the database cannot be read.
        """
        gc.disable()
        try:
            loaded, evicted = await asyncio.to_thread(self._load_sync, time.time())
        finally:
            gc.enable()
        agents, ids, groups = loaded
        self._agents, self._ids, self._groups = agents, ids, groups
        self._changes += 1
        for gone, reason in evicted:
            self._evicted.add(gone)
            if self.on_evicted is not None:
                self.on_evicted(reason)

    def _load_sync(
        self, now: float
    ) -> tuple[tuple[OrderedDict[str, _Values], list[str], Counter[str]], list[tuple[str, str]]]:
        records: list[_Values] = []
        for _key, value in self._kv.items_sync(_PREFIX):
            if isinstance(value, dict):
                with contextlib.suppress(AttributeError, TypeError, ValueError):
                    records.append(AgentRecord.from_dict(value)._v)  # noqa: SLF001
        records.sort(key=lambda v: v[_LAST_SEEN])
        over = max(len(records) - self.max_agents, 0)
        evicted = [(v[_ID], "cap") for v in records[:over]]
        records = records[over:]
        if self.idle_expiry:
            fresh = bisect.bisect_left(records, now - self.idle_expiry, key=lambda v: v[_LAST_SEEN])
            evicted += [(v[_ID], "idle") for v in records[:fresh]]
            records = records[fresh:]
        agents = OrderedDict((v[_ID], v) for v in records)
        return (agents, sorted(agents), Counter(v[_GROUP] for v in records)), evicted

    # -- membership ------------------------------------------------------------

    def _add(self, record: AgentRecord) -> None:
        values = record._v  # noqa: SLF001 - the registry's own records
        agent_id = values[_ID]
        self._agents[agent_id] = values
        record._home = self  # noqa: SLF001
        bisect.insort(self._ids, agent_id)
        self._groups[values[_GROUP]] += 1
        self._evicted.discard(agent_id)

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
            elif self.idle_expiry and oldest[_LAST_SEEN] < now - self.idle_expiry:
                reason = "idle"
            else:
                return
            self._drop(oldest)
            if self.on_evicted is not None:
                self.on_evicted(reason)

    def _drop(self, values: _Values) -> None:
        agent_id = values[_ID]
        del self._agents[agent_id]
        self._kept.pop(agent_id, None)
        at = bisect.bisect_left(self._ids, agent_id)
        if at < len(self._ids) and self._ids[at] == agent_id:
            del self._ids[at]
        self._uncount(values[_GROUP])
        self._dirty.discard(agent_id)
        self._urgent.discard(agent_id)
        self._evicted.add(agent_id)
        self._changes += 1

    def get(self, agent_id: str) -> AgentRecord | None:
        """The record of ``agent_id``."""
        values = self._agents.get(agent_id)
        return None if values is None else AgentRecord._view(self, values)  # noqa: SLF001

    def all(self) -> list[AgentRecord]:
        """Every record, sorted by id (walks every record: from a thread, or in tests)."""
        return list(self._snapshot())

    def page(self, after: str | None, limit: int) -> list[AgentRecord]:
        """At most ``limit`` records by id, the first after ``after`` (``None``: from the start).

        O(log n + limit): a bisection of the sorted ids.
        """
        ids = self._ids
        start = bisect.bisect_right(ids, after) if after is not None else 0
        agents = self._agents
        return [AgentRecord._view(self, agents[i]) for i in ids[start : start + limit]]  # noqa: SLF001

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
        if record._home is self and record._stored() is None:  # noqa: SLF001
            return  # evicted: its changes are not the registry's
        self._dirty.add(record.agent_id)
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
        stored = self._agents.get(agent_id)
        substance = stored is None
        if stored is None:
            record = AgentRecord(agent_id, group=group, first_seen=now)
        else:
            record = AgentRecord._view(self, stored)  # noqa: SLF001
        v = record._v  # noqa: SLF001 - read once: one new tuple for the whole change
        changes: dict[int, object] = {_ADDRESS: _s(address), _LAST_SEEN: now}
        if v[_GROUP] != group:  # a known agent moved (a new one has it already)
            self._uncount(v[_GROUP])
            self._groups[group] += 1
            changes[_GROUP] = _s(group)
            substance = True
        items = tuple(_installed_item(i) for i in installed)
        if items != v[_INSTALLED]:
            changes[_INSTALLED] = items
            substance = True
        if v[_DEFER_DAYS] != defer_days:
            changes[_DEFER_DAYS] = defer_days
            substance = True
        record._update(changes)  # noqa: SLF001
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
        before = _offer_substance(record._current()[_OFFERED])  # noqa: SLF001
        changes: dict[int, object] = {_OFFERED: _offer_items(offered)}
        substance = _offer_substance(changes[_OFFERED]) != before  # type: ignore[arg-type]
        if first_offered:
            times = record.first_offered
            new = {k: v for k, v in first_offered.items() if k not in times}
            if new:
                changes[_FIRST_OFFERED] = _first_offered_items({**times, **new})
                substance = True
        record._update(changes)  # noqa: SLF001
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
        record = self.get(agent_id) or AgentRecord(agent_id, first_seen=now, address=address)
        for event in events:
            record.add_event(event)
        record.last_seen = now
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

        A record of an agent evicted since it was read is not saved (nor brought back).
        """
        agent_id = record.agent_id
        home = record._home  # noqa: SLF001
        if home is None:  # a record made outside the registry: it joins it
            if agent_id not in self._agents:
                self._touch(record, time.time())
                self._urgent.add(agent_id)
        elif home is not self or record._stored() is None:  # noqa: SLF001
            return  # evicted: never brought back by an old view (nothing of it is written)
        self._dirty.add(agent_id)
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
        if not (self._dirty or self._evicted) and self._writing is not None:
            await asyncio.shield(self._writing)  # the batch being written is pending too
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
        dirty, self._dirty = self._dirty, set()
        gone, self._evicted = self._evicted, set()
        commit, self._commit = self._commit, None
        if self._kv.damaged and commit is None:
            return  # nothing can be written and nobody waits to hear it
        writing = asyncio.get_running_loop().create_future()
        self._writing = writing
        try:
            await self._write_taken(dirty, gone, commit)
        finally:
            self._writing = None
            writing.set_result(None)

    async def _write_taken(
        self, dirty: set[str], gone: set[str], commit: asyncio.Future[None] | None
    ) -> None:
        agents = self._agents
        values = [v for i in dirty if (v := agents.get(i)) is not None]  # as they are now
        try:
            if dirty or gone:
                await asyncio.to_thread(self._write_sync, values, sorted(gone))
        except Exception as error:  # the writer goes on; the records wait for the next batch
            e = error if isinstance(error, StateUnavailableError) else None
            if e is None:
                logger.exception("agent records: unexpected failure of a batch")
                e = StateUnavailableError(f"agent records not saved: {error!r}")
            self._failing = True
            if not self._kv.damaged:  # kept for the next batch (unless gone)
                self._dirty |= {i for i in dirty if i in self._agents}
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

    def _write_sync(self, records: list[_Values], gone: list[str]) -> None:
        self._kv.write_many_sync(
            {_PREFIX + v[_ID]: _to_dict(v) for v in records},
            [_PREFIX + g for g in gone],
        )

    # -- the fleet report (from a thread) ----------------------------------------

    def _snapshot(self) -> Iterator[AgentRecord]:
        """Every record by id; safe from a thread (the id list is copied at once)."""
        agents = self._agents
        for agent_id in list(self._ids):
            values = agents.get(agent_id)
            if values is not None:
                yield AgentRecord._view(self, values)  # noqa: SLF001

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
            records = (
                AgentRecord._view(self, v)  # noqa: SLF001
                for i in self._ids[start:]
                if (v := agents.get(i)) is not None
            )
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
            agents = 0

            def every_row() -> Iterator[ReportRow]:
                # One agent's rows at a time (not the whole report in memory at once).
                nonlocal agents
                for record in self._snapshot():
                    record_rows, worst = record.cached_rows(now)
                    states[worst] += 1
                    installed.update((p, v) for p, v, _s in record.installed_versions())
                    agents += 1
                    yield from record_rows

            versions = tuple(version_table(every_row()))
            self._summary = FleetSummary(at, agents, states, versions, installed, changes)
            return self._summary

    async def summary(self) -> FleetSummary:
        """:meth:`summary_sync` in a thread."""
        return await asyncio.to_thread(self.summary_sync)


def _retrieve(future: asyncio.Future[None]) -> None:
    # A commit nobody awaits any more (its callers left) must not log an unread error.
    if not future.cancelled():
        future.exception()

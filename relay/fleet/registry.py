"""The agent registry: who checked in, what they run, what they were offered, how it went.

Rules:

* Records live in the relay's state store (diskcache) and in memory; reads are
  served from memory, writes go through to disk in a thread, one record write
  per check-in or report.
* An agent is keyed by its ``agent_id`` (the ``Relay-Agent-Id`` it sends).
* Bounded: at most ``max_agents`` records; a new agent past that evicts the one
  seen longest ago, and agents not seen for ``idle_expiry`` seconds are dropped
  (each counted through ``on_evicted`` with ``"cap"`` or ``"idle"``). Records are
  kept in the order they were last seen, so both cost O(1) per check-in.
* The registry keeps, per agent, when each (product, version) was first offered:
  on-demand deadlines count from that moment (docs/PROTOCOL.md).
* It keeps each agent's newest :data:`EVENTS_KEPT` report events (newest first),
  what it was last offered per product (:class:`relay.core.fleet.LastOffer`),
  and its installed versions, updated by check-ins and by ``installed`` reports
  as they arrive.
* States are derived on reading (:func:`relay.core.fleet.derive_state`), never
  stored: they depend on the time (an on-demand deadline passes). The report rows
  of an agent are kept in memory until its record changes or one of its
  on-demand deadlines passes, so a scrape or a report costs little per agent.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from relay.core.fleet import LastOffer, ReportRow, derive_state, parse_time
from relay.core.protocol import Event, ReportEvent, rfc3339
from relay.storage.kv import KV

_PREFIX = "agent:"
EVENTS_KEPT = 20
"""Report events kept per agent (the newest)."""
MAX_AGENTS = 100_000
"""Agent records kept at most (the default of ``limits.max_agents``)."""
IDLE_EXPIRY = 90 * 86400.0
"""Seconds after which an agent not seen is forgotten (``limits.agent_expiry``)."""


@dataclass(slots=True)
class AgentRecord:
    """What the relay knows of one agent."""

    agent_id: str
    group: str = "default"
    address: str = ""
    first_seen: float = 0.0
    last_seen: float = 0.0
    installed: list[dict[str, str]] = field(default_factory=list)
    first_offered: dict[str, float] = field(default_factory=dict)  # "product@version" -> time
    defer_days: int = 0
    last_outcome: dict[str, Any] | None = None
    failures: int = 0
    events: list[dict[str, Any]] = field(default_factory=list)  # newest first
    offered: dict[str, dict[str, Any]] = field(default_factory=dict)  # product -> LastOffer

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AgentRecord:
        """Inverse of :meth:`to_dict` (unknown keys are dropped)."""
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def version_of(self, product: str) -> str | None:
        """The installed version of ``product``, if any."""
        for item in self.installed:
            if item.get("product") == product:
                return item.get("version")
        return None

    def offer_of(self, product: str) -> LastOffer | None:
        """What the relay last offered for ``product`` (``None``: never, or unreadable)."""
        raw = self.offered.get(product)
        if raw is None:
            return None
        try:
            return LastOffer.from_dict(raw)
        except ValueError:
            return None

    def add_event(self, event: ReportEvent) -> None:
        """Record one report event: newest first, bounded; it updates the versions installed."""
        data = event.to_dict()
        self.events.insert(0, data)
        del self.events[EVENTS_KEPT:]
        self.last_outcome = data
        if event.event is Event.FAILED:
            self.failures += 1
        elif event.event is Event.INSTALLED and event.product and event.to_version:
            offer = self.offer_of(event.product)
            sha = offer.sha256 if offer is not None and offer.version == event.to_version else ""
            self.installed = [i for i in self.installed if i.get("product") != event.product]
            self.installed.append(
                {"product": event.product, "version": event.to_version, "sha256": sha}
            )
        elif event.event is Event.UNINSTALLED and event.product:
            self.installed = [i for i in self.installed if i.get("product") != event.product]

    def rows_change_at(self) -> float:
        """When the derived states may change without a new write: the next deadline."""
        deadlines = [
            when.timestamp()
            for raw in self.offered.values()
            if (when := parse_time(raw.get("deadline"))) is not None
        ]
        return min(deadlines, default=math.inf)

    def rows(self, now: dt.datetime) -> list[ReportRow]:
        """One report row per product the agent has, was offered or reported on."""
        newest: dict[str, dict[str, Any]] = {}
        for event in self.events:
            newest.setdefault(str(event.get("product", "")), event)
        products = {str(i.get("product", "")) for i in self.installed}
        products |= set(self.offered) | {p for p in newest if p}
        latest = self.events[0] if self.events else {}
        if not latest.get("product") and latest.get("event") == Event.FAILED:
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
                last_event=last,
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
                    last_event=str(last.get("event", "")) if last else "",
                    last_event_at=str(last.get("at", "")) if last else "",
                    last_seen=last_seen or "",
                    address=self.address,
                )
            )
        return out


class Registry:
    """Agent records in memory, persisted in the state store."""

    def __init__(
        self, kv: KV, *, max_agents: int = MAX_AGENTS, idle_expiry: float = IDLE_EXPIRY
    ) -> None:
        self._kv = kv
        self.max_agents = max_agents
        self.idle_expiry = idle_expiry
        self.on_evicted: Callable[[str], None] | None = None
        # Least recently seen first: the next to evict.
        self._agents: OrderedDict[str, AgentRecord] = OrderedDict()
        self._evicted: list[str] = []  # ids whose stored records the next save deletes
        # agent id -> (computed at, valid until, rows); dropped on every change
        self._rows: dict[str, tuple[float, float, list[ReportRow]]] = {}

    async def load(self) -> None:
        """Read every record from disk (the newest ``max_agents`` by last seen are kept)."""
        records = [
            AgentRecord.from_dict(value)
            for _key, value in await self._kv.items(_PREFIX)
            if isinstance(value, dict)
        ]
        for record in sorted(records, key=lambda r: r.last_seen):
            self._agents[record.agent_id] = record
        self._bound(time.time())

    def _touch(self, record: AgentRecord, now: float) -> None:
        """``record`` was just seen: it goes last in eviction order; the bounds hold."""
        self._agents[record.agent_id] = record
        self._agents.move_to_end(record.agent_id)
        self._rows.pop(record.agent_id, None)
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
            del self._agents[oldest.agent_id]
            self._rows.pop(oldest.agent_id, None)
            self._evicted.append(oldest.agent_id)
            if self.on_evicted is not None:
                self.on_evicted(reason)

    def get(self, agent_id: str) -> AgentRecord | None:
        """The record of ``agent_id``."""
        return self._agents.get(agent_id)

    def all(self) -> list[AgentRecord]:
        """Every record, sorted by id."""
        return sorted(self._agents.values(), key=lambda r: r.agent_id)

    def groups(self) -> set[str]:
        """The groups agents checked in with (no sort of the records: one pass)."""
        return {r.group for r in self._agents.values()}

    def __len__(self) -> int:
        return len(self._agents)

    async def save(self, record: AgentRecord) -> None:
        """Persist ``record`` (and forget the stored records of evicted agents).

        Raises:
            StateUnavailableError: it could not be saved.
        """
        if record.agent_id not in self._agents:
            self._touch(record, time.time())
        self._rows.pop(record.agent_id, None)
        await self._kv.set(_PREFIX + record.agent_id, record.to_dict())
        while self._evicted:
            gone = self._evicted.pop()
            if gone not in self._agents:
                await self._kv.delete(_PREFIX + gone)

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
        record = self._agents.get(agent_id) or AgentRecord(agent_id=agent_id, first_seen=now)
        record.group = group
        record.address = address
        record.last_seen = now
        record.installed = installed
        record.defer_days = defer_days
        self._touch(record, now)
        return record

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
            agent_id=agent_id, first_seen=now, address=address
        )
        for event in events:
            record.add_event(event)
        record.last_seen = now
        self._touch(record, now)
        return record

    def rows(self, now: dt.datetime | None = None) -> list[ReportRow]:
        """The fleet report: every agent's rows, by agent id then product."""
        now = now or dt.datetime.now(dt.UTC)
        return [row for record in self.all() for row in self.rows_of(record, now)]

    def rows_of(self, record: AgentRecord, now: dt.datetime) -> list[ReportRow]:
        """One agent's report rows (kept until its record changes or a deadline passes)."""
        at = now.timestamp()
        cached = self._rows.get(record.agent_id)
        if cached is None or not cached[0] <= at < cached[1]:
            cached = (at, record.rows_change_at(), record.rows(now))
            self._rows[record.agent_id] = cached
        return cached[2]

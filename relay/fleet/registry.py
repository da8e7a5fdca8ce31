"""The agent registry: who checked in, what they run, and how their updates went.

Rules:

* Records live in the relay's state store (diskcache) and in memory; reads are
  served from memory, writes go through to disk in a thread.
* An agent is keyed by its ``agent_id`` (the ``Relay-Agent-Id`` it sends).
* The registry keeps, per agent, when each (product, version) was first offered:
  on-demand deadlines count from that moment (docs/PROTOCOL.md).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from relay.storage.kv import KV

_PREFIX = "agent:"


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


class Registry:
    """Agent records in memory, persisted in the state store."""

    def __init__(self, kv: KV) -> None:
        self._kv = kv
        self._agents: dict[str, AgentRecord] = {}

    async def load(self) -> None:
        """Read every record from disk."""
        for _key, value in await self._kv.items(_PREFIX):
            if isinstance(value, dict):
                record = AgentRecord.from_dict(value)
                self._agents[record.agent_id] = record

    def get(self, agent_id: str) -> AgentRecord | None:
        """The record of ``agent_id``."""
        return self._agents.get(agent_id)

    def all(self) -> list[AgentRecord]:
        """Every record, sorted by id."""
        return sorted(self._agents.values(), key=lambda r: r.agent_id)

    def __len__(self) -> int:
        return len(self._agents)

    async def save(self, record: AgentRecord) -> None:
        """Persist ``record``."""
        self._agents[record.agent_id] = record
        await self._kv.set(_PREFIX + record.agent_id, record.to_dict())

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
        self._agents[agent_id] = record
        return record

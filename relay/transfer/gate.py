"""Admission of transfers: slots in total and per agent (no I/O).

Past either limit a request is refused with the reason; the server answers
``503`` with ``Retry-After`` rather than collapsing under load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(slots=True)
class TransferGate:
    """Counts transfers in progress, in total and per agent (no I/O).

    ``0`` means unlimited.
    """

    max_total: int
    max_per_agent: int
    active: int = 0
    per_agent: dict[str, int] = field(default_factory=dict)
    on_idle: Callable[[], None] | None = None  # called when the last transfer leaves

    def try_enter(self, agent: str) -> str | None:
        """Take a slot; return ``None``, or the reason it was refused."""
        if self.max_total and self.active >= self.max_total:
            return "max_transfers"
        current = self.per_agent.get(agent, 0)
        if self.max_per_agent and current >= self.max_per_agent:
            return "max_transfers_per_agent"
        self.active += 1
        self.per_agent[agent] = current + 1
        return None

    def leave(self, agent: str) -> None:
        """Give a slot back."""
        self.active -= 1
        left = self.per_agent.get(agent, 1) - 1
        if left <= 0:
            self.per_agent.pop(agent, None)
        else:
            self.per_agent[agent] = left
        if self.active == 0 and self.on_idle is not None:
            self.on_idle()  # a draining relay waits for this

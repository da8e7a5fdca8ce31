"""The groups a relay knows: those its agents report and those its decisions name."""

from __future__ import annotations

from relay.core.policy import PolicyState
from relay.core.protocol import DEFAULT_GROUP
from relay.fleet.registry import Registry


def known_groups(registry: Registry, state: PolicyState) -> list[str]:
    """Every group an agent checked in with or an approval names, and the default one."""
    known = {DEFAULT_GROUP} | registry.groups()
    known |= {g for (_p, _v, g) in state.approvals if g is not None}
    return sorted(known)

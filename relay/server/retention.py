"""What the relay fetches ahead and keeps in its store, decided by policy and deltas.

Rules:

* A version is pinned (never evicted) when the policy pins it
  (:func:`relay.core.policy.pinned_versions`: the newest ``store.keep_versions``
  of each product, every approved version, the version each group is offered),
  or when it is the base of a kept patch. A version declined for every group
  is never pinned.
* A blob is prefetched when some known group would be offered it
  (:func:`relay.core.policy.should_prefetch`).
"""

from __future__ import annotations

from relay.core.model import Target
from relay.core.policy import pinned_versions, should_prefetch
from relay.core.verify import VerifiedMetadata
from relay.deltas.service import DeltaService
from relay.fleet.approvals import PolicyStore
from relay.fleet.groups import known_groups
from relay.fleet.registry import Registry


class PinPolicy:
    """The relay's :class:`relay.cache.mirror.Retention`: policy pins and delta bases.

    Args:
        policy: the approvals and settings.
        registry: the agents (their groups).
        keep_versions: newest versions of each product always kept.

    Attributes:
        current: the verified metadata the pins are computed on (set on every
            new generation).
        deltas: the delta service whose kept patches' bases are pinned.
    """

    def __init__(self, *, policy: PolicyStore, registry: Registry, keep_versions: int) -> None:
        self._policy = policy
        self._registry = registry
        self._keep_versions = keep_versions
        self.current: VerifiedMetadata | None = None
        self.deltas: DeltaService | None = None

    def groups(self) -> list[str]:
        """The groups the relay knows."""
        return known_groups(self._registry, self._policy.state)

    def wanted(self, target: Target) -> bool:
        """Whether some group would be offered ``target`` (prefetch it)."""
        return should_prefetch(self._policy.state, self._policy.settings, target, self.groups())

    def pins(self) -> set[str]:
        """The digests the store must not evict."""
        pins = set(self.deltas.bases_pinned()) if self.deltas is not None else set()
        if self.current is not None:
            kept = pinned_versions(
                self.current.targets.values(),
                self._policy.state,
                self._policy.settings,
                self.groups(),
                keep_versions=self._keep_versions,
            )
            pins.update(t.sha256 for t in kept)
        return pins

"""What the relay fetches ahead and keeps in its store, decided by policy and deltas.

Rules (a store under a quota must keep what agents need, and nothing else forever):

* Prefetch fetches only what some known group is offered now
  (:func:`relay.core.policy.offered_versions`), never older versions nobody is
  pointed at.
* Pinned (never evicted) are: the versions pinned by the policy
  (:func:`relay.core.policy.pinned_versions`: the newest ``store.keep_versions``
  of each product, every approved version, the version each group is offered
  now), and the bases of kept patches that lead to one of those versions (so a
  patch to what agents are offered can still be served and checked). A version
  declined for every group is never pinned; a patch to a version nobody is
  offered pins nothing.
* Both are computed once per generation and policy change (the inputs are
  immutable values, replaced on change), not once per target or per fill. The
  known groups come from the registry's group counter (O(groups), never a walk
  of the agents): a pin or prefetch decision costs the same at 50 or 50,000
  agents.
"""

from __future__ import annotations

from collections.abc import Iterable

from relay.core.model import Target
from relay.core.policy import offered_versions, pinned_versions
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
        self._cache_key: tuple[object, ...] = ()
        self._offered: frozenset[str] = frozenset()
        self._pinned: frozenset[str] = frozenset()

    def groups(self) -> list[str]:
        """The groups the relay knows."""
        return known_groups(self._registry, self._policy.state)

    def wanted(self, targets: Iterable[Target]) -> set[str]:
        """The digests among ``targets`` that some group is offered now (prefetch them)."""
        self._refresh()
        return {t.sha256 for t in targets if t.sha256 in self._offered}

    def pins(self) -> set[str]:
        """The digests the store must not evict."""
        self._refresh()
        pins = set(self._pinned)
        if self.deltas is not None:
            pins.update(src for src, dst in self.deltas.kept_pairs() if dst in self._pinned)
        return pins

    def _refresh(self) -> None:
        policy = self._policy
        groups = self.groups()
        key = (self.current, policy.state, policy.settings, tuple(groups))
        old = self._cache_key
        if old and all(a is b for a, b in zip(key[:3], old[:3], strict=True)) and key[3] == old[3]:
            return  # the same immutable inputs (held here, so their ids cannot be reused)
        targets = self.current.targets.values() if self.current is not None else ()
        offered = offered_versions(targets, policy.state, policy.settings, groups)
        pinned = pinned_versions(
            targets, policy.state, policy.settings, groups, keep_versions=self._keep_versions
        )
        self._offered = frozenset(t.sha256 for t in offered)
        self._pinned = frozenset(t.sha256 for t in pinned)
        self._cache_key = key

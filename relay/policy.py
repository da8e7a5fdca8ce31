"""Approvals and rollout policy, as pure functions (no I/O, time passed in).

Rules (DESIGN §3, §7), in the order they are applied to one target for one group:

1. Status: the group's own approval, else the all-groups approval, else
   *undefined*. A ``critical`` update with "auto-approve critical" on counts as
   approved (forced) unless an administrator declined it.
2. EULA gate: an update naming an ``eula`` is offerable only once that EULA is
   accepted — whatever its status, auto-approval and "install undefined" included;
   :func:`approve` refuses such an update before its EULA is accepted.
3. Offerable: approved; or undefined with "install undefined" on for its kind.
   Declined is never offered. ``beta`` channel updates only for groups in
   ``beta_groups``.
4. Offer per product: the newest offerable version (SemVer). If the agent has it
   (same version and sha256): ``none``. If the agent's installed version is
   declined for its group: ``rollback`` to the newest offerable version older than
   it, or ``install`` of a newer offerable one; with nothing offerable, ``none``
   (there is no signed version to move to). Otherwise ``install``.
5. Mode: the explicit approval's mode (group's, else all-groups'), else the
   settings' ``rollout_mode``; auto-approved critical updates are forced. On-demand
   deadline = first offer of that version to this agent + the agent's chosen
   deferral (one of ``deferral_days``; the smallest when it chose none or another).
   Past the deadline the offer is forced (the deadline is kept in the offer).
6. Prefetch: whatever some group would be offered — with the default settings,
   content as soon as it is verified and software once approved. Declined updates
   are never prefetched and not pinned in the store.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

from relay.errors import EulaNotAcceptedError
from relay.model import Channel, Kind, Severity, Target


class Status(StrEnum):
    """An administrator's decision on an update."""

    UNDEFINED = "undefined"
    APPROVED = "approved"
    DECLINED = "declined"


class RolloutMode(StrEnum):
    """How an offered update is to be installed."""

    FORCED = "forced"
    ON_DEMAND = "on-demand"


class Action(StrEnum):
    """What an offer tells the agent to do."""

    INSTALL = "install"
    ROLLBACK = "rollback"
    NONE = "none"


ApprovalKey = tuple[str, str, str | None]  # (product, version, group or None = every group)


@dataclass(frozen=True, slots=True)
class Approval:
    """One decision."""

    status: Status
    mode: RolloutMode = RolloutMode.FORCED
    at: str = ""  # RFC 3339
    by: str = ""


@dataclass(frozen=True)
class PolicyState:
    """Everything administrators decided; JSON round-trippable (replicas copy it whole)."""

    approvals: Mapping[ApprovalKey, Approval] = field(default_factory=dict)
    eulas_accepted: frozenset[str] = frozenset()

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {
            "approvals": [
                {
                    "product": p,
                    "version": v,
                    "group": g,
                    "status": str(a.status),
                    "mode": str(a.mode),
                    "at": a.at,
                    "by": a.by,
                }
                for (p, v, g), a in sorted(self.approvals.items(), key=lambda kv: str(kv[0]))
            ],
            "eulas_accepted": sorted(self.eulas_accepted),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyState:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: a malformed entry (the message names the field).
        """
        approvals: dict[ApprovalKey, Approval] = {}
        raw = data.get("approvals", [])
        if not isinstance(raw, list):
            raise ValueError("approvals: expected a list")
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise ValueError(f"approvals[{i}]: expected an object")
            try:
                key = (str(item["product"]), str(item["version"]), item.get("group"))
                approvals[key] = Approval(
                    Status(item["status"]),
                    RolloutMode(item.get("mode", "forced")),
                    str(item.get("at", "")),
                    str(item.get("by", "")),
                )
            except (KeyError, ValueError) as e:
                raise ValueError(f"approvals[{i}]: {e}") from None
        eulas = data.get("eulas_accepted", [])
        if not isinstance(eulas, list) or not all(isinstance(e, str) for e in eulas):
            raise ValueError("eulas_accepted: expected a list of target paths")
        return cls(approvals, frozenset(eulas))


@dataclass(frozen=True)
class Settings:
    """Policy settings an administrator can change."""

    auto_approve_critical: bool = True
    install_undefined: Mapping[Kind, bool] = field(
        default_factory=lambda: {Kind.SOFTWARE: False, Kind.CONTENT: True, Kind.CONFIG: False}
    )
    beta_groups: frozenset[str] = frozenset()
    rollout_mode: RolloutMode = RolloutMode.FORCED
    deferral_days: tuple[int, ...] = (1, 3, 7)
    relays_only: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form."""
        return {
            "auto_approve_critical": self.auto_approve_critical,
            "install_undefined": {str(k): v for k, v in self.install_undefined.items()},
            "beta_groups": sorted(self.beta_groups),
            "rollout_mode": str(self.rollout_mode),
            "deferral_days": list(self.deferral_days),
            "relays_only": self.relays_only,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Settings | None = None) -> Settings:
        """Build from (part of) a dict, on top of ``base``.

        Raises:
            ValueError: an unknown or malformed field (the message names it).
        """
        out = base or cls()
        for key, value in data.items():
            if key in ("auto_approve_critical", "relays_only"):
                if not isinstance(value, bool):
                    raise ValueError(f"{key}: expected true or false")
                if key == "relays_only":
                    out = replace(out, relays_only=value)
                else:
                    out = replace(out, auto_approve_critical=value)
            elif key == "install_undefined":
                if not isinstance(value, dict):
                    raise ValueError("install_undefined: expected an object of kind: bool")
                merged = dict(out.install_undefined)
                for kind, on in value.items():
                    try:
                        k = Kind(kind)
                    except ValueError:
                        raise ValueError(f"install_undefined.{kind}: unknown kind") from None
                    if not isinstance(on, bool):
                        raise ValueError(f"install_undefined.{kind}: expected true or false")
                    merged[k] = on
                out = replace(out, install_undefined=merged)
            elif key == "beta_groups":
                if not isinstance(value, list) or not all(isinstance(g, str) for g in value):
                    raise ValueError("beta_groups: expected a list of group names")
                out = replace(out, beta_groups=frozenset(value))
            elif key == "rollout_mode":
                try:
                    out = replace(out, rollout_mode=RolloutMode(value))
                except ValueError:
                    raise ValueError("rollout_mode: expected forced or on-demand") from None
            elif key == "deferral_days":
                if (
                    not isinstance(value, list)
                    or not value
                    or not all(
                        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value
                    )
                ):
                    raise ValueError("deferral_days: expected a list of positive day counts")
                out = replace(out, deferral_days=tuple(sorted(value)))
            else:
                raise ValueError(f"{key}: unknown setting")
        return out


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True, slots=True)
class InstalledItem:
    """A product as an agent has it."""

    product: str
    version: str
    sha256: str


@dataclass(frozen=True, slots=True)
class AgentView:
    """What the policy needs to know of an agent."""

    agent_id: str
    group: str = "default"
    installed: tuple[InstalledItem, ...] = ()
    first_offered: Mapping[tuple[str, str], dt.datetime] = field(default_factory=dict)
    defer_days: int = 0


@dataclass(frozen=True, slots=True)
class Offer:
    """The decision for one product and one agent."""

    product: str
    action: Action
    target: Target | None
    mode: RolloutMode = RolloutMode.FORCED
    deadline: dt.datetime | None = None


# -- status -----------------------------------------------------------------------


def explicit_approval(state: PolicyState, target: Target, group: str) -> Approval | None:
    """The administrator's decision for ``group`` (its own, else every group's)."""
    own = state.approvals.get((target.product, target.version, group))
    if own is not None and own.status is not Status.UNDEFINED:
        return own
    every = state.approvals.get((target.product, target.version, None))
    if every is not None and every.status is not Status.UNDEFINED:
        return every
    return None


def _eula_ok(state: PolicyState, target: Target) -> bool:
    return target.info.eula is None or target.info.eula in state.eulas_accepted


def effective_status(state: PolicyState, settings: Settings, target: Target, group: str) -> Status:
    """The status that decides offers: explicit decision, else automatic rules."""
    explicit = explicit_approval(state, target, group)
    if explicit is not None:
        return explicit.status
    if settings.auto_approve_critical and target.info.severity is Severity.CRITICAL:
        return Status.APPROVED if _eula_ok(state, target) else Status.UNDEFINED
    return Status.UNDEFINED


def offerable(state: PolicyState, settings: Settings, target: Target, group: str) -> bool:
    """Whether ``target`` may be offered to agents of ``group``."""
    if not _eula_ok(state, target):
        return False
    if target.info.channel is Channel.BETA and group not in settings.beta_groups:
        return False
    status = effective_status(state, settings, target, group)
    if status is Status.APPROVED:
        return True
    if status is Status.DECLINED:
        return False
    return bool(settings.install_undefined.get(target.info.kind, False))


# -- changes ----------------------------------------------------------------------


def _set(state: PolicyState, target: Target, group: str | None, approval: Approval) -> PolicyState:
    approvals = dict(state.approvals)
    approvals[(target.product, target.version, group)] = approval
    return replace(state, approvals=approvals)


def approve(
    state: PolicyState,
    target: Target,
    *,
    group: str | None = None,
    mode: RolloutMode = RolloutMode.FORCED,
    at: str = "",
    by: str = "",
) -> PolicyState:
    """Approve ``target`` (for ``group``, or every group).

    Raises:
        EulaNotAcceptedError: the target names an EULA not yet accepted.
    """
    if not _eula_ok(state, target):
        raise EulaNotAcceptedError(
            f"{target.path} requires accepting the EULA {target.info.eula} first"
        )
    return _set(state, target, group, Approval(Status.APPROVED, mode, at, by))


def decline(
    state: PolicyState, target: Target, *, group: str | None = None, at: str = "", by: str = ""
) -> PolicyState:
    """Decline ``target``: never offered; agents that have it move back."""
    return _set(state, target, group, Approval(Status.DECLINED, RolloutMode.FORCED, at, by))


def reset(state: PolicyState, target: Target, *, group: str | None = None) -> PolicyState:
    """Forget the decision on ``target`` (back to undefined)."""
    approvals = dict(state.approvals)
    approvals.pop((target.product, target.version, group), None)
    return replace(state, approvals=approvals)


def accept_eula(state: PolicyState, eula_path: str) -> PolicyState:
    """Record that an administrator accepted the EULA at ``eula_path``."""
    return replace(state, eulas_accepted=state.eulas_accepted | {eula_path})


# -- offers -----------------------------------------------------------------------


def _mode_and_deadline(
    state: PolicyState,
    settings: Settings,
    target: Target,
    agent: AgentView,
    now: dt.datetime,
) -> tuple[RolloutMode, dt.datetime | None]:
    explicit = explicit_approval(state, target, agent.group)
    if explicit is not None:
        mode = explicit.mode
    elif settings.auto_approve_critical and target.info.severity is Severity.CRITICAL:
        mode = RolloutMode.FORCED
    else:
        mode = settings.rollout_mode
    if mode is RolloutMode.FORCED:
        return mode, None
    choices = settings.deferral_days or (1,)
    days = agent.defer_days if agent.defer_days in choices else min(choices)
    first = agent.first_offered.get((target.product, target.version), now)
    deadline = first + dt.timedelta(days=days)
    if now >= deadline:
        return RolloutMode.FORCED, deadline
    return RolloutMode.ON_DEMAND, deadline


def offer_for_product(
    product: str,
    targets: Sequence[Target],
    state: PolicyState,
    settings: Settings,
    agent: AgentView,
    now: dt.datetime,
) -> Offer:
    """The offer for one product (``targets``: that product's versions)."""
    ordered = sorted(targets, key=lambda t: t.info.semver)
    candidates = [t for t in ordered if offerable(state, settings, t, agent.group)]
    installed = next((i for i in agent.installed if i.product == product), None)
    best = candidates[-1] if candidates else None
    if installed is not None:
        current = next((t for t in ordered if t.version == installed.version), None)
        declined = current is not None and (
            effective_status(state, settings, current, agent.group) is Status.DECLINED
        )
        if declined and current is not None:
            if best is None:
                return Offer(product, Action.NONE, None)
            if best.info.semver < current.info.semver:
                mode, deadline = _mode_and_deadline(state, settings, best, agent, now)
                # A declined version is left at once: the move back is forced.
                return Offer(product, Action.ROLLBACK, best, RolloutMode.FORCED, deadline)
        if best is None:
            return Offer(product, Action.NONE, None)
        if best.version == installed.version and best.sha256 == installed.sha256:
            return Offer(product, Action.NONE, best)
    if best is None:
        return Offer(product, Action.NONE, None)
    mode, deadline = _mode_and_deadline(state, settings, best, agent, now)
    return Offer(product, Action.INSTALL, best, mode, deadline)


def offers(
    targets: Iterable[Target],
    state: PolicyState,
    settings: Settings,
    agent: AgentView,
    now: dt.datetime,
) -> list[Offer]:
    """One offer per product known to the metadata or installed by the agent."""
    by_product: dict[str, list[Target]] = {}
    for t in targets:
        by_product.setdefault(t.product, []).append(t)
    for item in agent.installed:
        by_product.setdefault(item.product, [])
    return [
        offer_for_product(p, ts, state, settings, agent, now)
        for p, ts in sorted(by_product.items())
    ]


# -- store and prefetch -------------------------------------------------------------


def should_prefetch(
    state: PolicyState, settings: Settings, target: Target, groups: Iterable[str]
) -> bool:
    """Whether to prefetch ``target``: when some group would be offered it.

    With the default settings: content as soon as it is verified (install-undefined
    is on for content), software once approved.
    """
    return any(offerable(state, settings, target, g) for g in groups)


def declined_everywhere(
    state: PolicyState, settings: Settings, target: Target, groups: Iterable[str]
) -> bool:
    """Whether no group may receive ``target`` because it is declined for all of them."""
    return all(effective_status(state, settings, target, g) is Status.DECLINED for g in groups)


def pinned_digests(
    targets: Iterable[Target], state: PolicyState, settings: Settings, groups: Iterable[str]
) -> set[str]:
    """Digests the store must keep for the policy (DESIGN §2).

    Every explicitly approved version, and the version each group is currently
    offered for each product. Declined versions are never pinned by the policy.
    """
    by_product: dict[str, list[Target]] = {}
    for t in targets:
        by_product.setdefault(t.product, []).append(t)
    approved = {(p, v) for (p, v, _g), a in state.approvals.items() if a.status is Status.APPROVED}
    group_list = list(groups)
    pins: set[str] = set()
    for versions in by_product.values():
        ordered = sorted(versions, key=lambda t: t.info.semver)
        pins.update(t.sha256 for t in ordered if (t.product, t.version) in approved)
        for g in group_list:
            offered = [t for t in ordered if offerable(state, settings, t, g)]
            if offered:
                pins.add(offered[-1].sha256)
    return pins

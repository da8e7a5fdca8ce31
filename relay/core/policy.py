"""Approvals and rollout policy, as pure functions (no I/O; time is passed in).

Everything here takes values and returns values: the admin API, the check-in
handler and the store call these functions and do the I/O themselves.

Rules (docs/PROTOCOL.md), applied to one target for one agent group:

1. Status. The group's own decision (approved or declined), else the all-groups
   decision, else automatic: a ``critical`` update counts as approved when
   "auto-approve critical" is on (an explicit decline still wins), anything else
   is *undefined*.
2. EULA gate. An update naming an ``eula`` is offered only once that EULA is
   accepted, whatever its status: auto-approval of critical updates and "install
   undefined" do not bypass it (such a critical update stays *undefined* until
   the EULA is accepted), and :func:`approve` raises
   :class:`~relay.errors.EulaNotAcceptedError` before acceptance. An approval
   that reached this relay some other way (a replica copying its parent) is still
   not offered until the EULA is accepted here too.
3. Offerable. The EULA gate passes; the channel is ``stable``, or ``beta`` and the
   group is in ``beta_groups``; and the status is approved, or undefined with
   "install undefined" on for the target's kind. Declined is never offered.
   Every target is a candidate of its own product, EULA texts included (they
   follow the same rules as any other target of their product).
4. Offer per product. *Best* = the newest offerable version (SemVer precedence).

   a. Nothing installed: ``install`` best; ``none`` (no target) if there is none.
   b. The installed version is declined for the agent's group: the agent must
      leave it. ``install`` best if it is newer, ``rollback`` to best if it is
      older (the newest offerable version older than the declined one, since
      best is then the newest offerable of all). With nothing offerable,
      ``uninstall`` with the declined version as target: there is no signed
      version to move to, so the agent removes it.
      Leaving a declined version is always forced, without a deadline.
   c. The agent has best (same version and same sha256): ``none`` with best as
      target. Same version with another sha256: ``install`` best (a repair).
   d. The installed version is newer than best and not declined: ``none`` with
      no target. Only a decline moves an agent back, so an agent that got a
      newer version (from the origin, or before its approval was reset) keeps it.
   e. Otherwise (older, or not a SemVer version at all): ``install`` best.
5. Mode of an ``install`` that is not a move off a declined version: the explicit
   approval's mode (the group's, else the all-groups'); an auto-approved critical
   update is forced; an undefined update offered by "install undefined" takes the
   settings' ``rollout_mode``. On-demand deadline = the first offer of that
   version to this agent (``now`` if never offered) + the agent's chosen
   deferral if it is one of ``deferral_days``, else the smallest of them (an
   agent that chose none gets the smallest). From the deadline on, the offer is
   forced; the deadline stays in the offer.
6. Prefetch and pins. A target is prefetched when some known group would be
   offered it: with the default settings content as soon as it is verified and
   software once approved. Declined updates are never offered, never prefetched
   and never pinned. Pinned (docs/PROTOCOL.md) = the newest ``keep_versions`` versions of
   each product not declined everywhere, every explicitly approved version and
   the version each group is offered now.

Group lists passed to the prefetch and pin functions are the groups the relay
knows; an empty list means the default group, ``default``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from relay.core import schema
from relay.core.model import Channel, Kind, Severity, Target
from relay.core.protocol import DEFAULT_GROUP, InstalledItem
from relay.core.schema import InvalidValue, boolean, choice, integer, list_of, name, setting
from relay.core.semver import Version, is_valid
from relay.errors import EulaNotAcceptedError


class Status(StrEnum):
    """An administrator's decision on an update."""

    UNDEFINED = "undefined"
    """No decision: offered where "install undefined" is on for its kind."""
    APPROVED = "approved"
    """Offered."""
    DECLINED = "declined"
    """Never offered; agents that have it move back to the newest approved version."""


class RolloutMode(StrEnum):
    """How an offered update is to be installed."""

    FORCED = "forced"
    """Install now."""
    ON_DEMAND = "on-demand"
    """The user may defer by one of ``deferral_days``; forced past the deadline."""


class Action(StrEnum):
    """What an offer tells the agent to do."""

    INSTALL = "install"
    """Install the offered (newer) version."""
    ROLLBACK = "rollback"
    """Move back to the offered older version: the installed one is declined."""
    UNINSTALL = "uninstall"
    """Remove the installed version: it is declined and nothing else may be offered."""
    NONE = "none"
    """Nothing to do."""


ApprovalKey = tuple[str, str, str | None]  # (product, version, group or None = every group)

_DEFAULT_INSTALL_UNDEFINED: Mapping[Kind, bool] = {
    Kind.SOFTWARE: False,
    Kind.CONTENT: True,
    Kind.CONFIG: False,
}


@dataclass(frozen=True, slots=True)
class Approval:
    """One decision on one update, for one group or for every group."""

    status: Status
    mode: RolloutMode = RolloutMode.FORCED
    at: str = ""  # RFC 3339 UTC time of the decision, as persisted and audited
    by: str = ""  # who decided (an admin token's name)


@dataclass(frozen=True)
class PolicyState:
    """Everything administrators decided; JSON round-trippable (replicas copy it whole)."""

    approvals: Mapping[ApprovalKey, Approval] = field(default_factory=dict)
    eulas_accepted: frozenset[str] = frozenset()  # accepted EULA target paths

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-safe form, in a stable order.

        Returns:
            ``{"approvals": [{product, version, group, status, mode, at, by}],
            "eulas_accepted": [path, ...]}``.
        """
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
                for (p, v, g), a in sorted(
                    self.approvals.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or "")
                )
            ],
            "eulas_accepted": sorted(self.eulas_accepted),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PolicyState:
        """Build from the form :meth:`to_dict` returns.

        Args:
            data: the decoded JSON object; missing keys mean no decisions.

        Returns:
            The state.

        Raises:
            ValueError: a malformed entry (the message names the field).
        """
        raw = data.get("approvals", [])
        if not isinstance(raw, list):
            raise ValueError("approvals: expected a list")
        approvals: dict[ApprovalKey, Approval] = {}
        for i, item in enumerate(raw):
            where = f"approvals[{i}]"
            if not isinstance(item, dict):
                raise ValueError(f"{where}: expected an object")
            product = _text(item, "product", where, required=True)
            version = _text(item, "version", where, required=True)
            group = item.get("group")
            if group is not None and (not isinstance(group, str) or not group):
                raise ValueError(f"{where}.group: expected a group name or null")
            try:
                status = Status(str(item.get("status")))
            except ValueError:
                raise ValueError(
                    f"{where}.status: expected approved, declined or undefined"
                ) from None
            try:
                mode = RolloutMode(item.get("mode", RolloutMode.FORCED))
            except ValueError:
                raise ValueError(f"{where}.mode: expected forced or on-demand") from None
            approvals[(product, version, group)] = Approval(
                status, mode, _text(item, "at", where), _text(item, "by", where)
            )
        eulas = data.get("eulas_accepted", [])
        if not isinstance(eulas, list) or not all(isinstance(e, str) and e for e in eulas):
            raise ValueError("eulas_accepted: expected a list of target paths")
        return cls(approvals, frozenset(eulas))


def _text(item: Mapping[str, Any], key: str, where: str, *, required: bool = False) -> str:
    value = item.get(key, None if required else "")
    if not isinstance(value, str) or (required and not value):
        raise ValueError(f"{where}.{key}: expected a string")
    return value


MAX_DEFERRAL_DAYS = 365  # the longest deferral a setting may allow, in days
_KINDS = ", ".join(Kind)
_KIND_NAMES = frozenset(k.value for k in Kind)


def _install_undefined(value: object, text: bool) -> Mapping[Kind, bool]:
    # A table names some kinds (the others keep their default or, from the JSON form,
    # their current value); the text form lists the kinds that are on.
    if text and isinstance(value, str):
        on = {k.strip() for k in value.split(",") if k.strip()}
        unknown = on - _KIND_NAMES
        if unknown:
            raise InvalidValue(f"unknown kind {min(unknown)!r} (use {_KINDS})")
        return {k: k.value in on for k in Kind}
    if not isinstance(value, Mapping):
        raise InvalidValue("expected a table such as {software = false, content = true}")
    out: dict[Kind, bool] = {}
    for kind, on in value.items():
        if kind not in _KIND_NAMES:
            raise InvalidValue(f"unknown kind (use {_KINDS})", at=str(kind))
        if not isinstance(on, bool):
            raise InvalidValue("expected true or false", at=kind)
        out[Kind(kind)] = on
    return out


@dataclass(frozen=True)
class Settings:
    """Policy settings an administrator can change; the ``[policy]`` section extends them.

    Each field is declared once, with its parser and documentation
    (:func:`relay.core.schema.setting`): the configuration file, the environment, the
    command line, :meth:`from_dict` and :meth:`to_dict` all follow it.

    ``install_undefined`` may name only some kinds; the others keep their default
    (on for ``content``, off for ``software`` and ``config``). ``beta_groups`` keeps
    the order it is given in (a set is sorted), without repeats; ``deferral_days`` is
    sorted, without repeats.

    Raises:
        ValueError: on construction, ``deferral_days`` is empty or not positive.
    """

    auto_approve_critical: bool = setting(
        boolean, "boolean: critical updates are approved automatically", default=True
    )
    install_undefined: Mapping[Kind, bool] = setting(
        _install_undefined,
        "per kind: offer without approval",
        default=_DEFAULT_INSTALL_UNDEFINED,
        merge=True,
    )
    beta_groups: tuple[str, ...] = setting(
        list_of(name, unique=True),
        "list of agent groups that receive beta-channel updates",
        default=(),
    )
    rollout_mode: RolloutMode = setting(
        choice(*RolloutMode), "forced | on-demand", default=RolloutMode.FORCED
    )  # for updates without an explicit approval
    deferral_days: tuple[int, ...] = setting(
        list_of(integer(1, MAX_DEFERRAL_DAYS), unique=True, non_empty=True),
        "list of days an agent may defer on-demand updates (>= 1 item)",
        default=(1, 3, 7),
    )
    relays_only: bool = setting(
        boolean, "boolean: agents never fall back to the origin", default=False
    )

    def __post_init__(self) -> None:
        """Complete ``install_undefined``, normalise the lists and check ``deferral_days``."""
        merged = dict(_DEFAULT_INSTALL_UNDEFINED)
        merged.update({Kind(k): bool(v) for k, v in self.install_undefined.items()})
        groups: Iterable[str] = self.beta_groups  # a set is accepted too, and sorted
        ordered = sorted(groups) if isinstance(groups, AbstractSet) else dict.fromkeys(groups)
        if not self.deferral_days or not all(_positive_int(d) for d in self.deferral_days):
            raise ValueError(
                f"deferral_days: {self.deferral_days!r} is not a list of positive days"
            )
        object.__setattr__(self, "install_undefined", MappingProxyType(merged))
        object.__setattr__(self, "beta_groups", tuple(ordered))
        object.__setattr__(self, "rollout_mode", RolloutMode(self.rollout_mode))
        object.__setattr__(self, "deferral_days", tuple(sorted(set(self.deferral_days))))

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-safe form.

        Returns:
            One key per field; kinds and modes as their string values.
        """
        return schema.to_dict(schema.project(Settings, self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Settings | None = None) -> Settings:
        """Build from (part of) the form :meth:`to_dict` returns, on top of ``base``.

        The values are read as in the configuration file (the same rules and bounds).

        Args:
            data: the decoded JSON object; absent keys keep ``base``'s values.
            base: the settings to change (the defaults when ``None``).

        Returns:
            The new settings.

        Raises:
            ValueError: an unknown or malformed field (the message starts with its name).
        """
        return schema.from_dict(data, schema.project(Settings, base or cls()))


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True, slots=True)
class AgentView:
    """What the policy needs to know of an agent."""

    agent_id: str
    group: str = DEFAULT_GROUP
    installed: tuple[InstalledItem, ...] = ()
    # When each (product, version) was first offered to this agent.
    first_offered: Mapping[tuple[str, str], dt.datetime] = field(default_factory=dict)
    defer_days: int = 0  # the deferral the agent chose; 0 = none chosen


@dataclass(frozen=True, slots=True)
class Offer:
    """The decision for one product and one agent."""

    product: str
    action: Action
    target: Target | None
    mode: RolloutMode = RolloutMode.FORCED
    deadline: dt.datetime | None = None  # on-demand: forced from then on


# -- status -----------------------------------------------------------------------


def explicit_approval(state: PolicyState, target: Target, group: str | None) -> Approval | None:
    """Return the administrator's decision that applies to ``group``.

    Args:
        state: the decisions.
        target: the update.
        group: the agent group; ``None`` asks for the all-groups decision only.

    Returns:
        The group's own approved or declined entry, else the all-groups one, else
        ``None`` (entries with status undefined count as no decision).
    """
    keys: list[ApprovalKey] = [(target.product, target.version, None)]
    if group is not None:
        keys.insert(0, (target.product, target.version, group))
    for key in keys:
        found = state.approvals.get(key)
        if found is not None and found.status is not Status.UNDEFINED:
            return found
    return None


def _eula_ok(state: PolicyState, target: Target) -> bool:
    return target.info.eula is None or target.info.eula in state.eulas_accepted


def _auto_approved(state: PolicyState, settings: Settings, target: Target) -> bool:
    return (
        settings.auto_approve_critical
        and target.info.severity is Severity.CRITICAL
        and _eula_ok(state, target)
    )


def effective_status(
    state: PolicyState, settings: Settings, target: Target, group: str | None
) -> Status:
    """Return the status that decides offers (rule 1 and the EULA part of rule 2).

    Args:
        state: the decisions.
        settings: the policy settings (auto-approve critical).
        target: the update.
        group: the agent group; ``None`` for the all-groups view.

    Returns:
        The explicit decision, else approved for an auto-approved critical update
        whose EULA (if any) is accepted, else undefined.
    """
    explicit = explicit_approval(state, target, group)
    if explicit is not None:
        return explicit.status
    return Status.APPROVED if _auto_approved(state, settings, target) else Status.UNDEFINED


def offerable(state: PolicyState, settings: Settings, target: Target, group: str) -> bool:
    """Return whether ``target`` may be offered to agents of ``group`` (rule 3).

    Args:
        state: the decisions.
        settings: the policy settings.
        target: the update.
        group: the agent group.

    Returns:
        ``True`` when the EULA gate, the channel and the status all allow it.
    """
    if not _eula_ok(state, target):
        return False
    if target.info.channel is Channel.BETA and group not in settings.beta_groups:
        return False
    status = effective_status(state, settings, target, group)
    if status is Status.UNDEFINED:
        return settings.install_undefined[target.info.kind]
    return status is Status.APPROVED


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
    """Approve ``target`` for ``group``, or for every group.

    Args:
        state: the decisions so far.
        target: the update.
        group: the group, or ``None`` for every group without its own decision.
        mode: how agents are to install it.
        at: when (RFC 3339), for the record.
        by: who, for the record.

    Returns:
        The new state.

    Raises:
        EulaNotAcceptedError: the target names an EULA not accepted yet.
    """
    if not _eula_ok(state, target):
        raise EulaNotAcceptedError(
            f"{target.path} names the EULA {target.info.eula}: accept it before approving"
        )
    return _set(state, target, group, Approval(Status.APPROVED, mode, at, by))


def decline(
    state: PolicyState, target: Target, *, group: str | None = None, at: str = "", by: str = ""
) -> PolicyState:
    """Decline ``target``: never offered, and agents that have it move off it.

    Args:
        state: the decisions so far.
        target: the update.
        group: the group, or ``None`` for every group without its own decision.
        at: when (RFC 3339), for the record.
        by: who, for the record.

    Returns:
        The new state.

    Raises:
        Nothing: declining is always allowed.
    """
    return _set(state, target, group, Approval(Status.DECLINED, RolloutMode.FORCED, at, by))


def reset(state: PolicyState, target: Target, *, group: str | None = None) -> PolicyState:
    """Forget the decision on ``target`` for ``group`` (back to undefined).

    Args:
        state: the decisions so far.
        target: the update.
        group: the group, or ``None`` for the all-groups decision.

    Returns:
        The new state (the same decisions when there was none to forget).

    Raises:
        Nothing: resetting is always allowed.
    """
    approvals = dict(state.approvals)
    approvals.pop((target.product, target.version, group), None)
    return replace(state, approvals=approvals)


def accept_eula(state: PolicyState, eula_path: str) -> PolicyState:
    """Record that an administrator accepted the EULA at ``eula_path``.

    Args:
        state: the decisions so far.
        eula_path: the EULA's target path, as updates name it in ``eula``.

    Returns:
        The new state.

    Raises:
        ValueError: ``eula_path`` is empty.
    """
    if not eula_path:
        raise ValueError("eula_path: expected a target path")
    return replace(state, eulas_accepted=state.eulas_accepted | {eula_path})


# -- offers -----------------------------------------------------------------------


def _order(target: Target) -> tuple[Version, str]:
    return (target.info.semver, target.path)


def _mode_and_deadline(
    state: PolicyState, settings: Settings, target: Target, agent: AgentView, now: dt.datetime
) -> tuple[RolloutMode, dt.datetime | None]:
    # Rule 5.
    explicit = explicit_approval(state, target, agent.group)
    if explicit is not None:
        mode = explicit.mode
    elif _auto_approved(state, settings, target):
        mode = RolloutMode.FORCED
    else:
        mode = settings.rollout_mode
    if mode is RolloutMode.FORCED:
        return mode, None
    choices = settings.deferral_days
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
    """Return the offer for one product to one agent (rules 4 and 5).

    Args:
        product: the product.
        targets: that product's verified targets (others are ignored).
        state: the decisions.
        settings: the policy settings.
        agent: the agent asking.
        now: the current time (timezone-aware).

    Returns:
        The offer; ``target`` is ``None`` when there is nothing to point at.

    Raises:
        Nothing: every input has a defined answer.
    """
    ordered = sorted((t for t in targets if t.product == product), key=_order)
    candidates = [t for t in ordered if offerable(state, settings, t, agent.group)]
    best = candidates[-1] if candidates else None
    installed = next((i for i in agent.installed if i.product == product), None)
    if installed is None:  # 4a
        return _install(best, product, state, settings, agent, now)
    current = next((t for t in ordered if t.version == installed.version), None)
    if (
        current is not None
        and effective_status(state, settings, current, agent.group) is Status.DECLINED
    ):  # 4b
        if best is None:
            return Offer(product, Action.UNINSTALL, current, RolloutMode.FORCED, None)
        action = Action.INSTALL if current.info.semver < best.info.semver else Action.ROLLBACK
        return Offer(product, action, best, RolloutMode.FORCED, None)
    if best is None:
        return Offer(product, Action.NONE, None)
    if installed.version == best.version:  # 4c
        if installed.sha256 == best.sha256:
            return Offer(product, Action.NONE, best)
        return _install(best, product, state, settings, agent, now)
    if is_valid(installed.version) and best.info.semver < Version.parse(installed.version):
        return Offer(product, Action.NONE, None)  # 4d
    return _install(best, product, state, settings, agent, now)  # 4e


def _install(
    best: Target | None,
    product: str,
    state: PolicyState,
    settings: Settings,
    agent: AgentView,
    now: dt.datetime,
) -> Offer:
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
    """Return one offer per product in the metadata or installed by the agent.

    Args:
        targets: every verified target.
        state: the decisions.
        settings: the policy settings.
        agent: the agent asking.
        now: the current time (timezone-aware).

    Returns:
        The offers, sorted by product.

    Raises:
        Nothing: every input has a defined answer.
    """
    by_product = _by_product(targets)
    for item in agent.installed:
        by_product.setdefault(item.product, [])
    return [
        offer_for_product(p, ts, state, settings, agent, now)
        for p, ts in sorted(by_product.items())
    ]


def _by_product(targets: Iterable[Target]) -> dict[str, list[Target]]:
    out: dict[str, list[Target]] = {}
    for t in targets:
        out.setdefault(t.product, []).append(t)
    return out


# -- store and prefetch -------------------------------------------------------------


def _groups(groups: Iterable[str]) -> list[str]:
    return list(groups) or [DEFAULT_GROUP]


class Prefetch(StrEnum):
    """Which blobs a relay fetches before anyone asks (``sync.prefetch``).

    ``policy``: what some group is offered now (:func:`offered_versions`);
    ``all``: every target of each new generation; ``none``: each on its first request.
    """

    POLICY = "policy"
    ALL = "all"
    NONE = "none"


def should_prefetch(
    state: PolicyState, settings: Settings, target: Target, groups: Iterable[str]
) -> bool:
    """Return whether to fetch ``target`` before any agent asks for it (rule 6).

    Args:
        state: the decisions.
        settings: the policy settings.
        target: a verified target.
        groups: the groups the relay knows (empty: the default group).

    Returns:
        ``True`` when some group would be offered it: with the default settings,
        content as soon as it is verified and software once approved; never a
        declined update.

    Raises:
        Nothing: every input has a defined answer.
    """
    return any(offerable(state, settings, target, g) for g in _groups(groups))


def declined_everywhere(
    state: PolicyState, settings: Settings, target: Target, groups: Iterable[str]
) -> bool:
    """Return whether ``target`` is declined for every group the relay knows.

    Args are those of :func:`should_prefetch`.

    Returns:
        ``True`` when no known group may receive it because it is declined; the
        store then stops pinning it.

    Raises:
        Nothing: every input has a defined answer.
    """
    return all(
        effective_status(state, settings, target, g) is Status.DECLINED for g in _groups(groups)
    )


def pinned_versions(
    targets: Iterable[Target],
    state: PolicyState,
    settings: Settings,
    groups: Iterable[str],
    *,
    keep_versions: int = 0,
) -> set[Target]:
    """Return the targets the store must keep (docs/PROTOCOL.md).

    Args:
        targets: every verified target.
        state: the decisions.
        settings: the policy settings.
        groups: the groups the relay knows (empty: the default group).
        keep_versions: how many of each product's newest versions are kept
            whatever the decisions (those declined everywhere excepted).

    Returns:
        The newest ``keep_versions`` versions of each product, every explicitly
        approved version and the version each group is offered now; never a
        version declined for every group.

    Raises:
        ValueError: ``keep_versions`` is negative.
    """
    if keep_versions < 0:
        raise ValueError(f"keep_versions: {keep_versions} is negative")
    group_list = _groups(groups)
    approved = {(p, v) for (p, v, _g), a in state.approvals.items() if a.status is Status.APPROVED}
    pins: set[Target] = set()
    for versions in _by_product(targets).values():
        kept = [
            t
            for t in sorted(versions, key=_order)
            if not declined_everywhere(state, settings, t, group_list)
        ]
        if keep_versions:
            pins.update(kept[-keep_versions:])
        pins.update(t for t in kept if (t.product, t.version) in approved)
        pins.update(_offered(kept, state, settings, group_list))
    return pins


def offered_versions(
    targets: Iterable[Target], state: PolicyState, settings: Settings, groups: Iterable[str]
) -> set[Target]:
    """Return the version of each product that some known group is offered now.

    This is what an agent of the group is pointed at, whatever it has installed
    (an install, or the move back from a declined version): the newest version
    the group may be offered. Prefetch fetches exactly these.

    Args are those of :func:`pinned_versions`, without ``keep_versions``.

    Raises:
        Nothing: every input has a defined answer.
    """
    group_list = _groups(groups)
    out: set[Target] = set()
    for versions in _by_product(targets).values():
        out.update(_offered(sorted(versions, key=_order), state, settings, group_list))
    return out


def _offered(
    ordered: Sequence[Target], state: PolicyState, settings: Settings, groups: Sequence[str]
) -> set[Target]:
    out: set[Target] = set()
    for g in groups:
        best = next((t for t in reversed(ordered) if offerable(state, settings, t, g)), None)
        if best is not None:
            out.add(best)
    return out


def pinned_digests(
    targets: Iterable[Target], state: PolicyState, settings: Settings, groups: Iterable[str]
) -> set[str]:
    """Return the sha256 of every target the policy pins, apart from the newest N.

    The store adds its newest ``keep_versions`` itself; this is
    :func:`pinned_versions` with ``keep_versions=0``, as digests.

    Args:
        targets: every verified target.
        state: the decisions.
        settings: the policy settings.
        groups: the groups the relay knows (empty: the default group).

    Returns:
        The digests of every explicitly approved version and of the version each
        group is offered now, declined-everywhere versions excepted.

    Raises:
        Nothing: every input has a defined answer.
    """
    return {t.sha256 for t in pinned_versions(targets, state, settings, groups)}

"""The fleet report, pure: each agent's state per product, report rows, CSV, version tables.

Rules (the state of one agent for one product, first match wins):

1. **failed**: the agent's newest event for the product is ``failed``, and either
   the relay has offered it nothing since it learned of the product, or the
   failure is about the version it is offered now (or names no version). A new
   offer of another version supersedes an older failure (rule 4 or 5 then).
2. **unknown**: the relay never answered a check-in of this agent for this
   product (only reports arrived), or it offers nothing and the agent does not
   have the product.
3. **up-to-date**: the relay offers nothing to do, or the agent reported the
   offered version installed after the offer.
4. **deferred**: the offer is on-demand, its deadline is still ahead, and the
   agent chose a deferral (``defer_days`` > 0): it will install at the deadline.
5. **pending**: otherwise (offered, not installed yet).

An agent-level failure (a report without a product: relays unreachable,
metadata refused) is a row with an empty product while it is the agent's newest
event.

Values in, values out: no I/O, no clock (``now`` is passed in).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

from relay.core.policy import Action, RolloutMode
from relay.core.protocol import Event


class FleetState(StrEnum):
    """Where one agent stands with one product."""

    UP_TO_DATE = "up-to-date"
    """Runs what the relay offers (or nothing is to be done)."""
    PENDING = "pending"
    """Offered a version it has not installed yet."""
    DEFERRED = "deferred"
    """Offered on-demand; the agent defers until the deadline."""
    FAILED = "failed"
    """Its newest attempt at the offered version failed."""
    UNKNOWN = "unknown"
    """The relay has not seen enough to say."""


@dataclass(frozen=True, slots=True)
class LastOffer:
    """What the relay last answered an agent's check-in for one product."""

    action: Action
    version: str = ""  # the offered version ("" when nothing is offered)
    sha256: str = ""
    mode: RolloutMode = RolloutMode.FORCED
    deadline: str | None = None  # RFC 3339; on-demand only
    at: str = ""  # RFC 3339: when it was offered

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "action": str(self.action),
            "version": self.version,
            "sha256": self.sha256,
            "mode": str(self.mode),
            "deadline": self.deadline,
            "at": self.at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LastOffer:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: an unknown action or mode.
        """
        deadline = data.get("deadline")
        return cls(
            action=Action(str(data.get("action", Action.NONE))),
            version=str(data.get("version", "")),
            sha256=str(data.get("sha256", "")),
            mode=RolloutMode(str(data.get("mode", RolloutMode.FORCED))),
            deadline=str(deadline) if deadline else None,
            at=str(data.get("at", "")),
        )


@dataclass(frozen=True, slots=True)
class Standing:
    """A derived state and why."""

    state: FleetState
    reason: str = ""
    message: str = ""


def parse_time(value: str | None) -> dt.datetime | None:
    """An RFC 3339 time (UTC when it names no zone); ``None`` for empty or malformed."""
    if not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def derive_state(
    *,
    installed: str | None,
    offer: LastOffer | None,
    last_event: Mapping[str, Any] | None,
    defer_days: int,
    now: dt.datetime,
) -> Standing:
    """Return where an agent stands with one product (the rules of this module).

    Args:
        installed: the version the agent has (``None``: not installed).
        offer: what the relay last offered it for the product (``None``: never).
        last_event: the agent's newest report event for the product (its JSON
            form: ``event``, ``to_version``, ``reason``, ``message``), if any.
        defer_days: the deferral the agent chose (0 = none).
        now: the current time (timezone-aware).

    Returns:
        The state, the reason (a failure's reason, or why it waits) and the
        failure's message.

    Raises:
        Nothing: every input has a defined answer.
    """
    if last_event is not None and last_event.get("event") == Event.FAILED:
        to_version = str(last_event.get("to_version", ""))
        if offer is None or (offer.action is not Action.NONE and to_version in ("", offer.version)):
            return Standing(
                FleetState.FAILED,
                str(last_event.get("reason", "")) or "failed",
                str(last_event.get("message", "")),
            )
    if offer is None:
        return Standing(FleetState.UNKNOWN, "no check-in answered for this product")
    if offer.action is Action.NONE:
        if installed is None:
            return Standing(FleetState.UNKNOWN, "not installed and nothing to offer")
        return Standing(FleetState.UP_TO_DATE)
    if offer.action is Action.UNINSTALL:  # a declined version with nothing to move to
        if installed != offer.version:
            return Standing(FleetState.UP_TO_DATE, f"{offer.version} declined: uninstalled")
        return Standing(FleetState.PENDING, f"uninstall {offer.version}: offered {offer.at}")
    if installed == offer.version:
        return Standing(FleetState.UP_TO_DATE)
    deadline = parse_time(offer.deadline)
    if (
        offer.mode is RolloutMode.ON_DEMAND
        and defer_days > 0
        and deadline is not None
        and deadline > now
    ):
        return Standing(FleetState.DEFERRED, f"on-demand, deferred until {offer.deadline}")
    if last_event is not None and last_event.get("event") == Event.DOWNLOADED:
        return Standing(FleetState.PENDING, f"{offer.action} {offer.version}: downloaded")
    return Standing(FleetState.PENDING, f"{offer.action} {offer.version}: offered {offer.at}")


# -- report rows ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReportRow:
    """One row of the fleet report: one agent and one product."""

    agent_id: str
    group: str
    product: str
    installed_version: str
    offered_version: str
    state: FleetState
    reason: str
    message: str
    last_event: str
    last_event_at: str
    last_seen: str
    address: str

    def to_dict(self) -> dict[str, str]:
        """The JSON form (every value a string)."""
        return {k: str(v) for k, v in asdict(self).items()}


REPORT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(ReportRow))
"""The CSV header, in order."""


def to_csv(rows: Iterable[ReportRow]) -> str:
    """The rows as RFC 4180 CSV: a header row, CRLF line ends, quoted where needed.

    Raises:
        Nothing: every value is written as text.
    """
    out = io.StringIO(newline="")
    writer = csv.writer(out, dialect="excel", lineterminator="\r\n")
    writer.writerow(REPORT_FIELDS)
    for row in rows:
        writer.writerow([_cell(v) for v in row.to_dict().values()])
    return out.getvalue()


def _cell(value: str) -> str:
    # A cell starting with = + - @ is a formula to a spreadsheet: make it text.
    if value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def filter_rows(
    rows: Iterable[ReportRow],
    *,
    state: FleetState | None = None,
    group: str | None = None,
    product: str | None = None,
) -> list[ReportRow]:
    """The rows matching every filter given (``None`` matches all).

    Raises:
        Nothing.
    """
    return [
        r
        for r in rows
        if (state is None or r.state is state)
        and (group is None or r.group == group)
        and (product is None or r.product == product)
    ]


# -- version distribution --------------------------------------------------------


@dataclass(slots=True)
class VersionCount:
    """How many agents of one group have, await or failed one version of one product."""

    product: str
    version: str
    group: str
    installed: int = 0  # agents that have this version
    up_to_date: int = 0  # ... and are up to date with it
    pending: int = 0  # agents offered this version, not installed yet
    deferred: int = 0
    failed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # failure reason -> agents

    def to_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return asdict(self)


_WAITING = {
    FleetState.PENDING: "pending",
    FleetState.DEFERRED: "deferred",
    FleetState.FAILED: "failed",
}


def version_table(rows: Iterable[ReportRow]) -> list[VersionCount]:
    """Count agents per product, version and group, from report rows.

    An agent counts under the version it has (``installed``, and
    ``up_to_date`` when it is in that state) and under the version it is offered
    when it is pending, deferred or failed (with the failure's reason).

    Raises:
        Nothing.
    """
    table: dict[tuple[str, str, str], VersionCount] = {}

    def entry(product: str, version: str, group: str) -> VersionCount:
        key = (product, version, group)
        if key not in table:
            table[key] = VersionCount(product, version, group)
        return table[key]

    for row in rows:
        if not row.product:
            continue
        if row.installed_version:
            have = entry(row.product, row.installed_version, row.group)
            have.installed += 1
            if row.state is FleetState.UP_TO_DATE:
                have.up_to_date += 1
        attr = _WAITING.get(row.state)
        if attr is not None and row.offered_version:
            want = entry(row.product, row.offered_version, row.group)
            setattr(want, attr, getattr(want, attr) + 1)
            if row.state is FleetState.FAILED:
                want.reasons[row.reason] = want.reasons.get(row.reason, 0) + 1
    return [table[k] for k in sorted(table)]


_WORST_FIRST = (
    FleetState.FAILED,
    FleetState.PENDING,
    FleetState.DEFERRED,
    FleetState.UNKNOWN,
    FleetState.UP_TO_DATE,
)


def worst_state(rows: Iterable[ReportRow]) -> FleetState:
    """The worst state among one agent's ``rows`` (``unknown`` for none).

    Worst first: failed, pending, deferred, unknown, up-to-date.

    Raises:
        Nothing.
    """
    ranks = [_WORST_FIRST.index(r.state) for r in rows]
    return _WORST_FIRST[min(ranks)] if ranks else FleetState.UNKNOWN


def count_states(rows: Iterable[ReportRow]) -> dict[FleetState, int]:
    """Agents by their worst state over their products (every state present, maybe 0).

    Raises:
        Nothing.
    """
    by_agent: dict[str, list[ReportRow]] = {}
    for row in rows:
        by_agent.setdefault(row.agent_id, []).append(row)
    counts = dict.fromkeys(FleetState, 0)
    for agent_rows in by_agent.values():
        counts[worst_state(agent_rows)] += 1
    return counts

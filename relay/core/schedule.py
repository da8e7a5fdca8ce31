"""Agent settings per group, install windows and slots: when an agent installs (no I/O).

Rules:

* An administrator sets :class:`GroupSettings` per agent group; the relay sends them
  in every check-in answer (``"settings"``) and the agent applies them at once.
* A schedule is a list of windows, each opening at ``start`` (local ``HH:MM``) on
  ``days`` (every day when empty) for ``window`` seconds (at most a week; a window
  may run past midnight). Without a schedule an agent installs as soon as an offer
  arrives.
* With a schedule, an agent draws one slot at random inside the next window (the
  one open now counts, from now on) and installs at that slot; the slot is kept
  until its window closes, so repeated check-ins do not redraw it, and a slot that
  was missed (the agent was off) gives way to a slot in the next window.
* What goes through at once whatever the schedule: an offer whose on-demand
  deadline has passed (forced deadlines still apply), new ``content`` when
  ``on_new_content`` is on, and moves off a declined version (rollbacks and
  uninstalls are the administrator's emergency brake).
* ``config_once_a_day``: a ``config`` target is installed at most once in any 24
  hours; the next one waits for the day to pass (and then for the schedule).

Times are passed in as timezone-aware datetimes (the agent's local time), and the
random fraction that places a slot is passed in too.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, cast

from relay.core.model import Kind
from relay.core.protocol import is_group
from relay.core.rates import Window
from relay.core.units import parse_duration

DAY = dt.timedelta(days=1)
MAX_WINDOW = 7 * 86400.0  # seconds: a window lasts at most a week
DEFAULT_POLL_SECONDS = 3600
MAX_ACTIONS = 32


@dataclass(frozen=True, slots=True)
class InstallWindow:
    """One recurring install window."""

    start: str  # HH:MM, the agent's local time
    window: float  # seconds the window stays open, > 0 and at most MAX_WINDOW
    days: tuple[str, ...] = ()  # mon..sun, the days it opens on; () = every day

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``window`` in whole seconds)."""
        return {"days": list(self.days), "start": self.start, "window": int(self.window)}

    @classmethod
    def from_dict(cls, data: object, where: str = "schedule[0]") -> InstallWindow:
        """Read ``{"days": [...], "start": "HH:MM", "window": duration}``.

        Raises:
            ValueError: a missing, unknown or malformed field (the message names it).
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected an object")
        unknown = set(data) - {"days", "start", "window"}
        if unknown:
            raise ValueError(f"{where}.{min(unknown)}: unknown field")
        start, days = data.get("start"), data.get("days", [])
        if not isinstance(days, list | tuple) or not all(isinstance(d, str) for d in days):
            raise ValueError(f"{where}.days: expected a list of day names (mon..sun)")
        if not isinstance(start, str):
            raise ValueError(f"{where}.start: expected HH:MM")
        try:
            Window.parse(start, start, days)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        try:
            seconds = parse_duration(data.get("window"))
        except ValueError as e:
            raise ValueError(f"{where}.window: {e}") from None
        if not 0 < seconds <= MAX_WINDOW:
            raise ValueError(f"{where}.window: must be more than 0 and at most 7 days")
        return cls(start, float(seconds), tuple(d.lower() for d in days))

    def openings(self, around: dt.datetime) -> list[tuple[dt.datetime, dt.datetime]]:
        """The ``(start, end)`` of each opening from a week before ``around`` to a week after."""
        parsed = Window.parse(self.start, self.start, self.days)
        hour, minute = divmod(parsed.start, 60)
        out = []
        for offset in range(-7, 9):
            day = around.date() + dt.timedelta(days=offset)
            if parsed.days and day.weekday() not in parsed.days:
                continue
            start = dt.datetime.combine(day, dt.time(hour, minute), tzinfo=around.tzinfo)
            out.append((start, start + dt.timedelta(seconds=self.window)))
        return out


@dataclass(frozen=True, slots=True)
class GroupSettings:
    """The agent settings of one group (``"settings"`` in a check-in answer)."""

    poll_seconds: int = DEFAULT_POLL_SECONDS  # seconds between check-ins without events
    events: bool = True  # hold GET /v1/events between check-ins
    schedule: tuple[InstallWindow, ...] = ()  # () = install as soon as offered
    on_new_content: bool = True  # new content goes through at once, whatever the schedule
    after_install: tuple[str, ...] = ()  # action names the agent runs after each install
    config_once_a_day: bool = False  # config targets at most once in 24 hours

    def to_dict(self) -> dict[str, Any]:
        """The JSON form of the check-in answer and the admin API."""
        return {
            "poll_seconds": self.poll_seconds,
            "events": self.events,
            "schedule": [w.to_dict() for w in self.schedule],
            "on_new_content": self.on_new_content,
            "actions": {"after_install": list(self.after_install)},
            "config_once_a_day": self.config_once_a_day,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: GroupSettings | None = None) -> GroupSettings:
        """Build from (part of) the JSON form, on top of ``base``.

        Args:
            data: the decoded object; absent keys keep ``base``'s values.
            base: the settings to change (the defaults when ``None``).

        Returns:
            The new settings.

        Raises:
            ValueError: an unknown or malformed field (the message names it).
        """
        out = base or cls()
        for key, value in data.items():
            if key in ("events", "on_new_content", "config_once_a_day"):
                if not isinstance(value, bool):
                    raise ValueError(f"{key}: expected true or false")
                out = replace(out, **cast("dict[str, Any]", {key: value}))
            elif key == "poll_seconds":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError("poll_seconds: expected a positive number of seconds")
                out = replace(out, poll_seconds=value)
            elif key == "schedule":
                if not isinstance(value, list):
                    raise ValueError("schedule: expected a list of windows")
                windows = tuple(
                    InstallWindow.from_dict(w, f"schedule[{i}]") for i, w in enumerate(value)
                )
                out = replace(out, schedule=windows)
            elif key == "actions":
                out = replace(out, after_install=_after_install(value))
            else:
                raise ValueError(f"{key}: unknown setting")
        return out


def _after_install(value: object) -> tuple[str, ...]:
    if not isinstance(value, Mapping) or set(value) - {"after_install"}:
        raise ValueError('actions: expected {"after_install": [name, ...]}')
    names = value.get("after_install", [])
    if (
        not isinstance(names, list)
        or len(names) > MAX_ACTIONS
        or not all(isinstance(n, str) and is_group(n) for n in names)
    ):
        raise ValueError(
            f"actions.after_install: expected at most {MAX_ACTIONS} action names"
            " (letters, digits and ._-)"
        )
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True, slots=True)
class Slot:
    """Where an agent installs: a moment inside one opening of a window."""

    start: dt.datetime  # the opening's start
    end: dt.datetime  # the opening's end (exclusive)
    at: dt.datetime  # the slot, start <= at < end

    def to_dict(self) -> dict[str, str]:
        """The JSON form the agent keeps in its state (ISO 8601 times)."""
        return {
            "start": self.start.isoformat(),
            "end": self.end.isoformat(),
            "at": self.at.isoformat(),
        }

    @classmethod
    def from_dict(cls, data: object) -> Slot | None:
        """Read the form :meth:`to_dict` writes; ``None`` when it is not one.

        Raises:
            Nothing: an unreadable record is ``None``.
        """
        if not isinstance(data, Mapping):
            return None
        try:
            start, end, at = (
                dt.datetime.fromisoformat(str(data[k])) for k in ("start", "end", "at")
            )
        except (KeyError, ValueError):
            return None
        if start.tzinfo is None or not start <= at < end:
            return None
        return cls(start, end, at)


def next_opening(
    windows: Sequence[InstallWindow], now: dt.datetime
) -> tuple[dt.datetime, dt.datetime] | None:
    """The opening that is open at ``now``, else the next one to open.

    Args:
        windows: the schedule.
        now: the agent's local time (timezone-aware).

    Returns:
        ``(start, end)``, or ``None`` for an empty schedule.
    """
    candidates = [(start, end) for w in windows for start, end in w.openings(now) if end > now]
    return min(candidates) if candidates else None


def plan_slot(
    windows: Sequence[InstallWindow], now: dt.datetime, fraction: float, kept: Slot | None = None
) -> Slot | None:
    """The slot to install at: ``kept`` while its opening has not closed, else a new one.

    Args:
        windows: the schedule.
        now: the agent's local time (timezone-aware).
        fraction: where in the opening the new slot falls, from 0 (its start, or
            ``now`` for an opening already open) to 1 (excluded: its end).
        kept: the slot drawn before, if any.

    Returns:
        The slot, or ``None`` for an empty schedule.

    Raises:
        ValueError: ``fraction`` is not in ``[0, 1)``.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction {fraction} is not in [0, 1)")
    if kept is not None and kept.end > now and _still_scheduled(windows, kept):
        return kept
    opening = next_opening(windows, now)
    if opening is None:
        return None
    start, end = opening
    earliest = max(start, now)
    return Slot(start, end, earliest + (end - earliest) * fraction)


def _still_scheduled(windows: Sequence[InstallWindow], slot: Slot) -> bool:
    # A slot drawn under an older schedule is dropped when the administrator changes it.
    return any((slot.start, slot.end) in w.openings(slot.start) for w in windows)


@dataclass(frozen=True, slots=True)
class InstallGate:
    """Whether to install an offer now, and if not, from when."""

    now: bool
    not_before: dt.datetime | None = None  # when to look again; None: at the next check-in
    why: str = ""


def install_gate(
    *,
    kind: Kind,
    deadline_passed: bool,
    leaving_declined: bool,
    settings: GroupSettings,
    now: dt.datetime,
    slot: Slot | None,
    last_config_install: dt.datetime | None,
) -> InstallGate:
    """Decide whether an offer is installed now (the rules of this module).

    Args:
        kind: the offered target's kind.
        deadline_passed: the offer is forced because its on-demand deadline passed.
        leaving_declined: a rollback or uninstall off a declined version.
        settings: the agent's group settings.
        now: the agent's local time (timezone-aware).
        slot: the agent's slot for ``settings.schedule`` (see :func:`plan_slot`).
        last_config_install: when a ``config`` target was last installed.

    Returns:
        ``now=True``, or the time to look again.
    """
    if deadline_passed:
        return InstallGate(now=True, why="deadline")
    if leaving_declined:
        return InstallGate(now=True, why="declined")
    if kind is Kind.CONTENT and settings.on_new_content:
        return InstallGate(now=True, why="content")
    if kind is Kind.CONFIG and settings.config_once_a_day and last_config_install is not None:
        next_day = last_config_install + DAY
        if now < next_day:
            return InstallGate(now=False, not_before=next_day, why="config once a day")
    if not settings.schedule:
        return InstallGate(now=True, why="no schedule")
    if slot is None:
        return InstallGate(now=False, why="no window")
    if slot.at <= now < slot.end:
        return InstallGate(now=True, why="slot")
    return InstallGate(now=False, not_before=slot.at, why="waiting for the slot")

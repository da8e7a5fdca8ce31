"""Install windows, slots and gates (relay.core.schedule): table tests on fixed times."""

from __future__ import annotations

import datetime as dt

import pytest

from relay.core.model import Kind
from relay.core.schedule import (
    GroupSettings,
    InstallWindow,
    Slot,
    install_gate,
    next_opening,
    plan_slot,
)

TZ = dt.timezone(dt.timedelta(hours=2))  # the agent's local time
MON = dt.datetime(2026, 11, 30, tzinfo=TZ)  # a Monday, 00:00


def at(day: int, hhmm: str) -> dt.datetime:
    hour, minute = map(int, hhmm.split(":"))
    return MON + dt.timedelta(days=day, hours=hour, minutes=minute)


NIGHTLY = InstallWindow("22:00", 4 * 3600)  # every day 22:00-02:00
SATURDAY = InstallWindow("02:00", 2 * 3600, ("sat",))


@pytest.mark.parametrize(
    ("windows", "now", "expected"),
    [
        ([NIGHTLY], at(0, "12:00"), (at(0, "22:00"), at(1, "02:00"))),  # later today
        ([NIGHTLY], at(0, "23:00"), (at(0, "22:00"), at(1, "02:00"))),  # open now
        ([NIGHTLY], at(1, "01:59"), (at(0, "22:00"), at(1, "02:00"))),  # open past midnight
        ([NIGHTLY], at(1, "02:00"), (at(1, "22:00"), at(2, "02:00"))),  # end is excluded
        ([SATURDAY], at(0, "12:00"), (at(5, "02:00"), at(5, "04:00"))),  # next Saturday
        ([SATURDAY], at(5, "04:00"), (at(12, "02:00"), at(12, "04:00"))),  # the one after
        ([SATURDAY, NIGHTLY], at(5, "01:00"), (at(4, "22:00"), at(5, "02:00"))),  # first wins
        ([], at(0, "12:00"), None),
    ],
)
def test_next_opening(windows, now, expected):
    assert next_opening(windows, now) == expected


@pytest.mark.parametrize(
    ("now", "fraction", "slot_at"),
    [
        (at(0, "12:00"), 0.0, at(0, "22:00")),  # before the window: from its start
        (at(0, "12:00"), 0.5, at(1, "00:00")),
        (at(0, "12:00"), 0.75, at(1, "01:00")),
        (at(0, "23:00"), 0.0, at(0, "23:00")),  # inside the window: from now on
        (at(0, "23:00"), 0.5, at(1, "00:30")),
    ],
)
def test_slot_is_drawn_inside_the_next_window(now, fraction, slot_at):
    slot = plan_slot([NIGHTLY], now, fraction)
    assert slot is not None
    assert slot.at == slot_at
    assert slot.start <= slot.at < slot.end


def test_a_slot_is_kept_until_its_window_closes_then_redrawn():
    slot = plan_slot([NIGHTLY], at(0, "12:00"), 0.5)
    assert plan_slot([NIGHTLY], at(0, "21:00"), 0.9, slot) == slot  # kept: not redrawn
    assert plan_slot([NIGHTLY], at(1, "01:00"), 0.9, slot) == slot  # its window still open
    missed = plan_slot([NIGHTLY], at(1, "03:00"), 0.0, slot)  # the agent was off
    assert missed == Slot(at(1, "22:00"), at(2, "02:00"), at(1, "22:00"))
    # A slot drawn under another schedule is dropped.
    other = plan_slot([SATURDAY], at(0, "12:00"), 0.0, slot)
    assert other is not None
    assert other.start == at(5, "02:00")
    assert Slot.from_dict(slot.to_dict()) == slot
    assert Slot.from_dict({"start": "x"}) is None
    with pytest.raises(ValueError, match="fraction"):
        plan_slot([NIGHTLY], at(0, "12:00"), 1.0)


SCHEDULED = GroupSettings(schedule=(NIGHTLY,), on_new_content=False)
SLOT = Slot(at(0, "22:00"), at(1, "02:00"), at(1, "00:00"))


def gate(kind=Kind.SOFTWARE, now=at(0, "12:00"), settings=SCHEDULED, slot=SLOT, **kw):
    args = {"deadline_passed": False, "leaving_declined": False, "last_config_install": None}
    args.update(kw)
    return install_gate(kind=kind, settings=settings, now=now, slot=slot, **args)


@pytest.mark.parametrize(
    ("name", "decision", "now", "not_before"),
    [
        ("no schedule: at once", gate(settings=GroupSettings()), True, None),
        ("before the slot: wait for it", gate(), False, SLOT.at),
        ("inside the window before the slot", gate(now=at(0, "23:00")), False, SLOT.at),
        ("at the slot", gate(now=SLOT.at), True, None),
        ("after the slot, window still open", gate(now=at(1, "01:59")), True, None),
        ("forced deadline passed: at once", gate(deadline_passed=True), True, None),
        ("leaving a declined version: at once", gate(leaving_declined=True), True, None),
        ("content held when on_new_content is off", gate(Kind.CONTENT), False, SLOT.at),
        (
            "content at once with on_new_content",
            gate(Kind.CONTENT, settings=GroupSettings(schedule=(NIGHTLY,))),
            True,
            None,
        ),
        (
            "config within a day of the last one waits for the day",
            gate(
                Kind.CONFIG,
                settings=GroupSettings(config_once_a_day=True),
                last_config_install=at(0, "09:00"),
            ),
            False,
            at(1, "09:00"),
        ),
        (
            "config a day after the last one goes",
            gate(
                Kind.CONFIG,
                now=at(1, "09:00"),
                settings=GroupSettings(config_once_a_day=True),
                last_config_install=at(0, "09:00"),
            ),
            True,
            None,
        ),
        (
            "config once a day off: no wait",
            gate(Kind.CONFIG, settings=GroupSettings(), last_config_install=at(0, "11:59")),
            True,
            None,
        ),
    ],
)
def test_install_gate(name, decision, now, not_before):
    assert (decision.now, decision.not_before) == (now, not_before), name


def test_group_settings_round_trip_and_partial_changes():
    base = GroupSettings(poll_seconds=600)
    changed = GroupSettings.from_dict(
        {
            "schedule": [{"days": ["Sat"], "start": "02:00", "window": "2h"}],
            "actions": {"after_install": ["scan-now", "scan-now"]},
            "events": False,
        },
        base,
    )
    assert changed.poll_seconds == 600  # kept
    assert changed.schedule == (InstallWindow("02:00", 7200.0, ("sat",)),)
    assert changed.after_install == ("scan-now",)
    assert not changed.events
    assert GroupSettings.from_dict(changed.to_dict()) == changed
    assert changed.to_dict()["schedule"] == [{"days": ["sat"], "start": "02:00", "window": 7200}]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"poll_seconds": 0}, "poll_seconds"),
        ({"poll_seconds": True}, "poll_seconds"),
        ({"events": "yes"}, "events"),
        ({"schedule": {}}, "schedule"),
        ({"schedule": [{"start": "25:00", "window": 60}]}, "schedule\\[0\\]"),
        ({"schedule": [{"start": "02:00", "window": 0}]}, "schedule\\[0\\].window"),
        ({"schedule": [{"start": "02:00", "window": "8d"}]}, "schedule\\[0\\].window"),
        ({"schedule": [{"start": "02:00", "window": 60, "days": ["xyz"]}]}, "schedule\\[0\\]"),
        ({"schedule": [{"start": "02:00", "window": 60, "end": "03:00"}]}, "schedule\\[0\\].end"),
        ({"actions": ["scan-now"]}, "actions"),
        ({"actions": {"after_install": ["rm -rf /"]}}, "actions.after_install"),
        ({"colour": "blue"}, "colour"),
    ],
)
def test_group_settings_refuse_malformed_fields(body, message):
    with pytest.raises(ValueError, match=message):
        GroupSettings.from_dict(body)

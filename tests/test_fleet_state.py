"""The fleet state rules, a row per rule; report rows, CSV, version and state tables."""

from __future__ import annotations

import csv
import datetime as dt
import io

import pytest

from relay.core.fleet import (
    REPORT_FIELDS,
    FleetState,
    LastOffer,
    ReportRow,
    count_states,
    derive_state,
    filter_rows,
    to_csv,
    version_table,
    worst_state,
)
from relay.core.policy import Action, RolloutMode
from relay.core.protocol import Event, ReportEvent
from relay.fleet.registry import EVENTS_KEPT, AgentRecord

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
LATER = "2026-03-04T12:00:00Z"
EARLIER = "2026-02-27T12:00:00Z"
INSTALL_2 = LastOffer(Action.INSTALL, "2.0.0", "ab" * 32, at="2026-03-01T11:00:00Z")
ON_DEMAND_2 = LastOffer(Action.INSTALL, "2.0.0", mode=RolloutMode.ON_DEMAND, deadline=LATER)
PAST_DEMAND_2 = LastOffer(Action.INSTALL, "2.0.0", mode=RolloutMode.FORCED, deadline=EARLIER)
ROLLBACK_1 = LastOffer(Action.ROLLBACK, "1.0.0")
NOTHING = LastOffer(Action.NONE)
UNINSTALL_1 = LastOffer(Action.UNINSTALL, "1.0.0")


def failed(to_version="2.0.0", reason="install_failed", message="exit 3"):
    return {"event": "failed", "to_version": to_version, "reason": reason, "message": message}


@pytest.mark.parametrize(
    ("installed", "offer", "event", "defer", "state", "reason"),
    [
        # rule 1: failed
        ("1.0.0", INSTALL_2, failed(), 0, FleetState.FAILED, "install_failed"),
        ("1.0.0", None, failed(), 0, FleetState.FAILED, "install_failed"),
        ("1.0.0", INSTALL_2, failed(to_version=""), 0, FleetState.FAILED, "install_failed"),
        ("1.0.0", INSTALL_2, failed(reason=""), 0, FleetState.FAILED, "failed"),
        ("1.0.0", ON_DEMAND_2, failed(), 3, FleetState.FAILED, "install_failed"),
        # a newer offer supersedes an older failure
        ("1.0.0", LastOffer(Action.INSTALL, "2.0.1"), failed(), 0, FleetState.PENDING, "install"),
        # the relay no longer asks for anything: not failed
        ("1.0.0", NOTHING, failed(), 0, FleetState.UP_TO_DATE, ""),
        # rule 2: unknown
        ("1.0.0", None, None, 0, FleetState.UNKNOWN, "no check-in"),
        (None, None, {"event": "downloaded"}, 0, FleetState.UNKNOWN, "no check-in"),
        (None, NOTHING, None, 0, FleetState.UNKNOWN, "not installed"),
        # rule 3: up to date
        ("1.0.0", NOTHING, None, 0, FleetState.UP_TO_DATE, ""),
        (
            "2.0.0",
            INSTALL_2,
            {"event": "installed", "to_version": "2.0.0"},
            0,
            FleetState.UP_TO_DATE,
            "",
        ),
        ("1.0.0", ROLLBACK_1, None, 0, FleetState.UP_TO_DATE, ""),
        # rule 4: deferred (on-demand, deadline ahead, the agent defers)
        ("1.0.0", ON_DEMAND_2, None, 3, FleetState.DEFERRED, f"deferred until {LATER}"),
        (None, ON_DEMAND_2, None, 1, FleetState.DEFERRED, "deferred"),
        # rule 5: pending
        ("1.0.0", ON_DEMAND_2, None, 0, FleetState.PENDING, "install 2.0.0"),
        ("1.0.0", PAST_DEMAND_2, None, 3, FleetState.PENDING, "install 2.0.0"),
        (
            "1.0.0",
            LastOffer(Action.INSTALL, "2.0.0", mode=RolloutMode.ON_DEMAND),
            None,
            3,
            FleetState.PENDING,
            "install",
        ),
        ("1.0.0", INSTALL_2, None, 0, FleetState.PENDING, "offered 2026-03-01T11:00:00Z"),
        (
            "1.0.0",
            INSTALL_2,
            {"event": "downloaded", "to_version": "2.0.0"},
            0,
            FleetState.PENDING,
            "downloaded",
        ),
        ("2.0.0", ROLLBACK_1, None, 0, FleetState.PENDING, "rollback 1.0.0"),
        # a declined version with nothing to move to: uninstall it
        ("1.0.0", UNINSTALL_1, None, 0, FleetState.PENDING, "uninstall 1.0.0"),
        (None, UNINSTALL_1, {"event": "uninstalled"}, 0, FleetState.UP_TO_DATE, "uninstalled"),
    ],
)
def test_state_rules(installed, offer, event, defer, state, reason):
    got = derive_state(
        installed=installed, offer=offer, last_event=event, defer_days=defer, now=NOW
    )
    assert got.state is state
    assert reason in got.reason
    if state is FleetState.FAILED:
        assert got.message == event["message"]


def test_last_offer_round_trips_and_refuses_unknown_words():
    assert LastOffer.from_dict(ON_DEMAND_2.to_dict()) == ON_DEMAND_2
    with pytest.raises(ValueError):
        LastOffer.from_dict({"action": "explode"})


def event(product, kind, to_version="2.0.0", reason="", message="", at="2026-03-01T12:00:00Z"):
    return ReportEvent(
        product, "1.0.0", to_version, Event(kind), reason=reason, message=message, at=at
    )


def test_record_keeps_newest_events_bounded_and_installed_versions_follow_reports():
    record = AgentRecord(
        "a1", installed=[{"product": "app", "version": "1.0.0", "sha256": "0" * 64}]
    )
    record.offered = {**record.offered, "app": INSTALL_2.to_dict()}
    for i in range(EVENTS_KEPT + 5):
        record.add_event(event("app", "failed", reason=f"r{i}"))
    assert len(record.events) == EVENTS_KEPT
    assert record.events[0]["reason"] == f"r{EVENTS_KEPT + 4}"  # newest first
    assert record.failures == EVENTS_KEPT + 5
    (row,) = record.rows(NOW)
    assert row.state is FleetState.FAILED and row.reason == f"r{EVENTS_KEPT + 4}"
    record.add_event(event("app", "installed"))
    assert record.installed == [{"product": "app", "version": "2.0.0", "sha256": INSTALL_2.sha256}]
    (row,) = record.rows(NOW)
    assert row.state is FleetState.UP_TO_DATE and row.installed_version == "2.0.0"


def test_an_uninstalled_report_removes_the_version():
    record = AgentRecord(
        "a1", installed=[{"product": "app", "version": "1.0.0", "sha256": "0" * 64}]
    )
    record.offered = {**record.offered, "app": UNINSTALL_1.to_dict()}
    (row,) = record.rows(NOW)
    assert row.state is FleetState.PENDING
    record.add_event(event("app", "uninstalled", to_version=""))
    assert record.installed == []
    (row,) = record.rows(NOW)
    assert (row.state, row.installed_version) == (FleetState.UP_TO_DATE, "")


def test_agent_level_failure_is_a_row_while_it_is_the_newest_event():
    record = AgentRecord("a1")
    record.add_event(event("", "failed", to_version="", reason="relays_unreachable"))
    (row,) = record.rows(NOW)
    assert (row.product, row.state, row.reason) == ("", FleetState.FAILED, "relays_unreachable")
    record.add_event(event("app", "downloaded"))
    assert [r.product for r in record.rows(NOW)] == ["app"]


def row(agent, product, installed, offered, state, group="default", reason=""):
    return ReportRow(agent, group, product, installed, offered, state, reason, "", "", "", "", "")


ROWS = [
    row("a1", "app", "1.0.0", "2.0.0", FleetState.FAILED, reason="install_failed"),
    row("a1", "sig", "7", "", FleetState.UP_TO_DATE),
    row("a2", "app", "1.0.0", "2.0.0", FleetState.PENDING),
    row("a3", "app", "2.0.0", "", FleetState.UP_TO_DATE, group="pilot"),
    row("a4", "app", "1.0.0", "2.0.0", FleetState.DEFERRED),
    row("a5", "app", "1.0.0", "2.0.0", FleetState.FAILED, reason="install_timeout"),
    row("a6", "", "", "", FleetState.FAILED, reason="relays_unreachable"),
]


def test_version_table_counts_have_and_want_with_reasons():
    table = {(v.product, v.version, v.group): v for v in version_table(ROWS)}
    assert set(table) == {
        ("app", "1.0.0", "default"),
        ("app", "2.0.0", "default"),
        ("app", "2.0.0", "pilot"),
        ("sig", "7", "default"),
    }
    old, new = table["app", "1.0.0", "default"], table["app", "2.0.0", "default"]
    assert (old.installed, old.up_to_date, old.pending, old.failed) == (4, 0, 0, 0)
    assert (new.installed, new.pending, new.deferred, new.failed) == (0, 1, 1, 2)
    assert new.reasons == {"install_failed": 1, "install_timeout": 1}
    assert table["app", "2.0.0", "pilot"].up_to_date == 1


def test_agents_by_worst_state_every_state_present():
    assert count_states(ROWS) == {
        FleetState.FAILED: 3,
        FleetState.PENDING: 1,
        FleetState.DEFERRED: 1,
        FleetState.UP_TO_DATE: 1,
        FleetState.UNKNOWN: 0,
    }
    assert count_states([]) == dict.fromkeys(FleetState, 0)


def test_filters():
    assert [r.agent_id for r in filter_rows(ROWS, state=FleetState.FAILED)] == ["a1", "a5", "a6"]
    assert [r.agent_id for r in filter_rows(ROWS, group="pilot")] == ["a3"]
    assert len(filter_rows(ROWS, product="app", state=FleetState.FAILED)) == 2
    assert filter_rows(ROWS) == ROWS


def test_csv_is_rfc4180_and_parses_back():
    nasty = 'bad, "quoted"\r\nand a second line'
    rows = [
        row("a1", "app", "1.0.0", "2.0.0", FleetState.FAILED, reason=nasty),
        row("a2", "app", "1.0.0", "", FleetState.UP_TO_DATE, reason='=HYPERLINK("x")'),
    ]
    text = to_csv(rows)
    assert text.startswith(",".join(REPORT_FIELDS) + "\r\n")
    assert text.endswith("\r\n")
    parsed = list(csv.DictReader(io.StringIO(text, newline="")))
    assert parsed[0]["reason"] == nasty and parsed[0]["state"] == "failed"
    # A formula-like cell is written as text.
    assert parsed[1]["reason"] == '\'=HYPERLINK("x")'


def test_worst_state_of_one_agent():
    assert worst_state(ROWS[:2]) is FleetState.FAILED
    assert worst_state([ROWS[1]]) is FleetState.UP_TO_DATE
    assert worst_state([]) is FleetState.UNKNOWN


def test_registry_rows_follow_changes_and_deadlines():
    from relay.fleet.registry import Registry

    reg = Registry(None)
    record = reg.checkin(
        "a1",
        group="lab",
        address="10.0.0.1",
        installed=[{"product": "app", "version": "1.0.0", "sha256": "0" * 64}],
        defer_days=3,
        now=NOW.timestamp(),
    )
    record.offered = {"app": ON_DEMAND_2.to_dict()}
    assert [r.state for r in reg.rows(NOW)] == [FleetState.DEFERRED]
    assert [r.state for r in reg.rows(NOW + dt.timedelta(hours=1))] == [FleetState.DEFERRED]
    # The deadline passes: the same record is now pending.
    after = dt.datetime.fromisoformat(LATER) + dt.timedelta(seconds=1)
    assert [r.state for r in reg.rows(after)] == [FleetState.PENDING]
    assert [r.state for r in reg.rows(NOW)] == [FleetState.DEFERRED]  # an earlier time
    # A report changes the record: the rows follow at once.
    reg.report("a1", [event("app", "failed", reason="install_failed")], address="10.0.0.1")
    (row,) = reg.rows(NOW)
    assert (row.state, row.reason) == (FleetState.FAILED, "install_failed")

"""The fleet report through a real relay and real agents: who failed and why, filters,
CSV a spreadsheet opens, agent details, version distribution, the token."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re

import aiohttp
import pytest

from relay.core.fleet import REPORT_FIELDS
from relay.fleet.registry import EVENTS_KEPT
from tests.fleet_support import V2, populate, start_fleet
from tests.support import relay_state


@pytest.fixture
async def fleet(tmp_path, aiohttp_server):
    fleet = await start_fleet(tmp_path, aiohttp_server)
    await populate(fleet)
    return fleet


def parse(text):
    return list(csv.DictReader(io.StringIO(text, newline="")))


async def report(fleet, query=""):
    status, text, headers = await fleet.admin("GET", f"/v1/admin/report.csv{query}")
    assert status == 200, text
    assert headers["Content-Type"] == "text/csv; charset=utf-8"
    return text


async def test_report_names_who_failed_and_why(fleet):
    text = await report(fleet)
    assert text.splitlines()[0] == ",".join(REPORT_FIELDS)
    rows = {r["agent_id"]: r for r in parse(text)}
    assert set(rows) == {"ok", "broken", "lazy", "new"}
    assert rows["ok"]["state"] == "up-to-date" and rows["ok"]["installed_version"] == "1.0.0"
    broken = rows["broken"]
    assert broken["state"] == "failed" and broken["reason"] == "install_failed"
    assert broken["offered_version"] == "1.0.0" and broken["installed_version"] == ""
    assert 'disk full, "C:" \nretry later' in broken["message"]
    assert broken["last_event"] == "failed" and broken["last_event_at"].endswith("Z")
    assert rows["lazy"]["state"] == "deferred" and "deferred until" in rows["lazy"]["reason"]
    assert rows["new"]["state"] == "pending" and rows["new"]["group"] == "lab"
    assert all(r["last_seen"].endswith("Z") for r in rows.values())


async def test_filters_by_state_group_and_product(fleet):
    failed = parse(await report(fleet, "?state=failed"))
    assert [r["agent_id"] for r in failed] == ["broken"]
    lab = parse(await report(fleet, "?group=lab"))
    assert sorted(r["agent_id"] for r in lab) == ["lazy", "new"]
    assert parse(await report(fleet, "?product=nothing")) == []
    assert len(parse(await report(fleet, "?product=app&state=up-to-date"))) == 1
    status, body, _ = await fleet.admin("GET", "/v1/admin/report.csv?state=exploded")
    assert status == 400 and body["error"].startswith("state")


async def test_token_required(fleet):
    failures = 0
    for path in ("/v1/admin/report.csv", "/v1/admin/agents/ok", "/v1/admin/versions"):
        for token in (None, "wrong"):
            status, _, headers = await fleet.admin("GET", path, token=token)
            failures += 1
            if failures <= 5:
                assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
            else:  # past five failures a minute, the address waits
                assert status == 429 and int(headers["Retry-After"]) > 0


async def test_csv_with_commas_quotes_and_newlines_in_reasons_parses_back(fleet):
    nasty = 'quota, "hard"\nlimit'
    body = {
        "agent_id": "odd",
        "events": [
            {
                "product": "app",
                "to_version": "1.0.0",
                "event": "failed",
                "reason": nasty,
                "message": 'line one\r\nline two, with "quotes"',
            },
        ],
    }
    async with aiohttp.ClientSession() as s:
        # Reports come only from agents that checked in.
        async with s.post(fleet.relay.make_url("/v1/checkin"), json={"agent_id": "odd"}) as r:
            assert r.status == 200
        async with s.post(fleet.relay.make_url("/v1/reports"), json=body) as r:
            assert r.status == 202
    text = await report(fleet, "?state=failed")
    rows = {r["agent_id"]: r for r in parse(text)}
    assert rows["odd"]["reason"] == nasty
    assert rows["odd"]["message"] == 'line one\r\nline two, with "quotes"'
    # Every record has every field (RFC 4180: same number of fields per line).
    reader = csv.reader(io.StringIO(text, newline=""))
    assert {len(r) for r in reader} == {len(REPORT_FIELDS)}


async def test_agent_details_with_recent_events_newest_first(fleet):
    status, body, _ = await fleet.admin("GET", "/v1/admin/agents/broken")
    assert status == 200
    assert body["agent_id"] == "broken" and body["group"] == "default"
    assert (
        body["events"][0]["event"] == "failed" and body["events"][0]["reason"] == "install_failed"
    )
    assert [p["state"] for p in body["products"]] == ["failed"]
    assert body["offered"]["app"]["version"] == "1.0.0"
    for _ in range(EVENTS_KEPT):
        await fleet.run("broken")
    _, body, _ = await fleet.admin("GET", "/v1/admin/agents/broken")
    assert len(body["events"]) == EVENTS_KEPT
    ats = [e["at"] for e in body["events"]]
    assert ats == sorted(ats, reverse=True)
    status, _, _ = await fleet.admin("GET", "/v1/admin/agents/nobody")
    assert status == 404


async def test_versions_and_installed_updates_before_the_next_checkin(fleet):
    status, body, _ = await fleet.admin("GET", "/v1/admin/versions")
    assert status == 200 and body["agents"] == 4
    assert body["states"] == {
        "up-to-date": 1,
        "pending": 1,
        "deferred": 1,
        "failed": 1,
        "unknown": 0,
    }
    table = {(v["product"], v["version"], v["group"]): v for v in body["versions"]}
    default = table["app", "1.0.0", "default"]
    assert (default["installed"], default["up_to_date"], default["failed"]) == (1, 1, 1)
    assert default["reasons"] == {"install_failed": 1}
    lab = table["app", "1.0.0", "lab"]
    assert (lab["pending"], lab["deferred"]) == (1, 1)
    # A new version: "ok" upgrades by delta; its installed report alone moves the registry.
    await fleet.publish(V2, "1.1.0")
    await fleet.approve("1.1.0")
    await fleet.run("ok")
    record = relay_state(fleet.relay).registry.get("ok")
    assert record.version_of("app") == "1.1.0"
    _, body, _ = await fleet.admin("GET", "/v1/admin/versions")
    table = {(v["product"], v["version"], v["group"]): v for v in body["versions"]}
    assert table["app", "1.1.0", "default"]["installed"] == 1


async def test_registry_survives_a_restart(tmp_path, aiohttp_server, fleet):
    state = relay_state(fleet.relay)
    before = json.dumps([r.to_dict() for r in state.registry.all()], sort_keys=True)
    from relay.fleet.registry import Registry

    again = Registry(state.registry._kv)
    await again.load()
    assert json.dumps([r.to_dict() for r in again.all()], sort_keys=True) == before


async def test_cli_report_versions_and_agents(fleet, tmp_path, capsys, monkeypatch):
    from relay.cli.main import main

    monkeypatch.setenv("RELAY_ADMIN_TOKEN", "fleet-t0ken-for-tests")

    def cli(*argv):
        return main(["admin", "--url", fleet.url, *argv])

    assert await asyncio.to_thread(cli, "report") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [
        "AGENT",
        "GROUP",
        "PRODUCT",
        "INSTALLED",
        "OFFERED",
        "STATE",
        "REASON",
        "LAST",
        "SEEN",
    ]
    assert len(out) == 5
    assert any(
        line.startswith("broken ") and "failed" in line and "install_failed" in line for line in out
    )
    assert await asyncio.to_thread(cli, "report", "--state", "failed", "--csv") == 0
    rows = parse(capsys.readouterr().out)
    assert [(r["agent_id"], r["reason"]) for r in rows] == [("broken", "install_failed")]
    assert 'disk full, "C:"' in rows[0]["message"]
    assert await asyncio.to_thread(cli, "report", "--group", "lab") == 0
    assert {line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]} == {"lazy", "new"}
    assert await asyncio.to_thread(cli, "versions") == 0
    out = capsys.readouterr().out
    assert (
        "install_failed: 1" in out
        and "agents: 4 (up-to-date 1, pending 1, deferred 1, failed 1" in out
    )
    assert await asyncio.to_thread(cli, "agents") == 0
    out = capsys.readouterr().out
    assert re.search(
        r"^broken +default +127\.0\.0\.1 +failed +failed app 1\.0\.0 \(install_failed\) +1$",
        out,
        re.MULTILINE,
    ), out
    assert re.search(r"^lazy +lab .* deferred ", out, re.MULTILINE), out
    with pytest.raises(SystemExit):
        cli("report", "--state", "exploded")

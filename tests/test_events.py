"""GET /v1/events on a real relay: holds, answers on content, policy and settings changes."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from relay.cli.main import main
from relay.core.events import Generation
from relay.core.schedule import GroupSettings
from relay.publisher.repository import Repository
from relay.server.events import EVENTS
from tests.support import Origin, relay_config, relay_state, settle, start_relay, write_root

TOKEN = "events-admin-token"
SIGS = b"signatures v1\n" * 1000


@pytest.fixture
def repo(tmp_path):
    repo = Repository.init(tmp_path / "repo")
    repo.add_bytes(SIGS, "sigs.db", product="sigs", version="1.0.0", kind="content")
    return repo


async def _relay(tmp_path, repo, aiohttp_server, **overrides):
    origin = Origin(repo.public_dir)
    server = await aiohttp_server(origin.app())
    root = write_root(tmp_path, repo.root_bytes(1))
    values = {"admin.token": TOKEN, "events.hold": 30, "events.splay": 10, **overrides}
    relay = await start_relay(
        aiohttp_server, relay_config(tmp_path, [str(server.make_url("/"))], root, **values)
    )
    await settle(relay)
    relay.url = str(relay.make_url("/")).rstrip("/")
    return relay


@pytest.fixture
async def relay(tmp_path, repo, aiohttp_server):
    return await _relay(tmp_path, repo, aiohttp_server)


async def checkin(session, relay, agent_id, group="default"):
    async with session.post(
        f"{relay.url}/v1/checkin", json={"agent_id": agent_id, "group": group}
    ) as r:
        assert r.status == 200
        return await r.json()


async def events(session, relay, agent_id, since, client="agent"):
    async with session.get(
        f"{relay.url}/v1/events",
        params={"since": since, "client": client},
        headers={"Relay-Agent-Id": agent_id} if agent_id else {},
    ) as r:
        return r.status, (await r.json() if r.status == 200 else None)


async def put_group(session, relay, group, body):
    async with session.put(
        f"{relay.url}/v1/admin/groups/{group}/settings",
        json=body,
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as r:
        return r.status, await r.json()


async def held(relay, count):
    """Wait (bounded) until ``count`` event requests are held by the relay."""
    hub = relay.app[EVENTS]
    for _ in range(500):
        if hub.waiting >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{hub.waiting} requests held, expected {count}")


async def test_checkin_answer_carries_generation_and_settings(relay):
    async with aiohttp.ClientSession() as s:
        answer = await checkin(s, relay, "a1")
    generation = Generation.parse(answer["generation"])
    assert generation is not None
    assert generation.content == relay_state(relay).mirror.current.timestamp_version
    assert answer["settings"] == {
        "poll_seconds": 3600,
        "events": True,
        "schedule": [],
        "on_new_content": True,
        "actions": {"after_install": []},
        "config_once_a_day": False,
    }
    assert answer["poll_seconds"] == answer["settings"]["poll_seconds"]


async def test_new_content_answers_a_held_request(relay, repo):
    async with aiohttp.ClientSession() as s:
        since = (await checkin(s, relay, "a1"))["generation"]
        waiting = asyncio.create_task(events(s, relay, "a1", since))
        await held(relay, 1)
        assert not waiting.done()
        repo.add_bytes(b"signatures v2\n" * 1000, "sigs.db", product="sigs", version="1.1.0",
                       kind="content")  # fmt: skip
        await relay_state(relay).mirror.sync_once()
        status, body = await waiting
        assert status == 200
        assert body["reasons"] == ["content"]
        assert body["delay_ms"] == 0  # the only one waiting
        assert body["generation"] != since
        assert body["generation"] == (await checkin(s, relay, "a1"))["generation"]


async def test_a_stale_since_is_answered_at_once(relay):
    """An agent that was away catches up at once (every part that changed is named)."""
    async with aiohttp.ClientSession() as s:
        since = (await checkin(s, relay, "a1"))["generation"]
        stale = str(Generation(0, *since.split(".")[1:]))
        assert await events(s, relay, "a1", stale) == (
            200,
            {"generation": since, "reasons": ["content"], "delay_ms": 0},
        )
        status, body = await events(s, relay, "a1", "")
        assert (status, body["reasons"]) == (200, ["content", "policy", "settings"])
        async with s.get(f"{relay.url}/v1/events", params={"since": "x" * 65}) as r:
            assert r.status == 400


async def test_the_hold_ends_with_204(tmp_path, repo, aiohttp_server):
    relay = await _relay(tmp_path, repo, aiohttp_server, **{"events.hold": 0.2})
    async with aiohttp.ClientSession() as s:
        since = (await checkin(s, relay, "a1"))["generation"]
        assert await events(s, relay, "a1", since) == (204, None)
    assert relay.app[EVENTS].waiting == 0


async def test_settings_change_wakes_only_the_group_concerned(relay):
    async with aiohttp.ClientSession() as s:
        pilot_since = (await checkin(s, relay, "p1", "pilot"))["generation"]
        default_since = (await checkin(s, relay, "d1"))["generation"]
        pilot = asyncio.create_task(events(s, relay, "p1", pilot_since))
        default = asyncio.create_task(events(s, relay, "d1", default_since))
        await held(relay, 2)
        status, body = await put_group(s, relay, "pilot", {"poll_seconds": 600})
        assert (status, body["poll_seconds"]) == (200, 600)
        status, answer = await pilot
        assert (status, answer["reasons"]) == (200, ["settings"])
        await held(relay, 1)  # the default group's request is still held
        assert not default.done()
        after = await checkin(s, relay, "p1", "pilot")
        assert after["settings"]["poll_seconds"] == 600
        assert after["poll_seconds"] == 600
        assert after["generation"] == answer["generation"]
        # A decision for every group concerns the default group too.
        async with s.post(
            f"{relay.url}/v1/admin/approvals",
            json={"product": "sigs", "version": "1.0.0", "status": "declined"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as r:
            assert r.status == 200
        status, answer = await default
        assert (status, answer["reasons"]) == (200, ["policy"])


async def test_a_wave_is_spread_over_the_splay(relay, repo):
    count = 8
    async with aiohttp.ClientSession() as s:
        since = (await checkin(s, relay, "a0"))["generation"]
        waiting = [asyncio.create_task(events(s, relay, f"a{i}", since)) for i in range(count)]
        await held(relay, count)
        await put_group(s, relay, "default", {"on_new_content": False})
        delays = sorted(body["delay_ms"] for _status, body in await asyncio.gather(*waiting))
    # Evenly spread over 10 s in wake order: 0, 1250, 2500, ...
    assert delays == [i * 10_000 // count for i in range(count)]


async def test_child_relays_are_woken_first_and_do_not_widen_the_agents_spread(relay):
    async with aiohttp.ClientSession() as s:
        since = (await checkin(s, relay, "a0"))["generation"]
        agents = [asyncio.create_task(events(s, relay, f"a{i}", since)) for i in range(4)]
        children = [
            asyncio.create_task(events(s, relay, "", since, client="relay")) for _ in range(2)
        ]
        await held(relay, 6)
        await put_group(s, relay, "default", {"on_new_content": False})
        relays = [body["delay_ms"] for _status, body in await asyncio.gather(*children)]
        delays = sorted(body["delay_ms"] for _status, body in await asyncio.gather(*agents))
        async with s.get(f"{relay.url}/v1/events", params={"client": "browser"}) as r:
            assert r.status == 400 and "client" in (await r.json())["error"]
    assert relays == [0, 0]
    assert delays == [0, 2500, 5000, 7500]  # four agents over 10 s, as if alone


async def test_group_settings_admin_api_and_cli(relay, capsys, monkeypatch):
    async with aiohttp.ClientSession() as s:
        window = [{"days": ["sat"], "start": "02:00", "window": "2h"}]
        status, body = await put_group(s, relay, "office-2", {"schedule": window})
        assert status == 200
        assert body["schedule"] == [{"days": ["sat"], "start": "02:00", "window": 7200}]
        status, body = await put_group(s, relay, "office-2", {"schedule": [{"start": "9"}]})
        assert status == 400
        assert body["error"].startswith("schedule[0]")
        status, body = await put_group(s, relay, "bad group!", {})
        assert status == 400
        async with s.get(
            f"{relay.url}/v1/admin/groups/office-2/settings",
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as r:
            assert (await r.json())["schedule"][0]["start"] == "02:00"
        async with s.get(f"{relay.url}/v1/admin/groups/office-2/settings") as r:
            assert r.status == 401
        async with s.get(
            f"{relay.url}/v1/admin/audit", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as r:
            audit = (await r.json())["audit"]
        changes = [e for e in audit if e["action"] == "group-settings"]
        assert changes[-1]["group"] == "office-2"
    monkeypatch.setenv("RELAY_ADMIN_TOKEN", TOKEN)
    cli = ["admin", "--url", relay.url, "groups", "office-2"]
    code = await asyncio.to_thread(main, [*cli, "--set", 'actions={"after_install": ["scan-now"]}'])
    assert code == 0
    assert '{"after_install": ["scan-now"]}' in capsys.readouterr().out
    assert await asyncio.to_thread(main, cli) == 0
    out = capsys.readouterr().out
    assert json.dumps([{"days": ["sat"], "start": "02:00", "window": 7200}]) in out
    assert relay_state(relay).policy.group_settings("office-2").after_install == ("scan-now",)


async def test_held_requests_are_answered_when_the_relay_stops(relay):
    async with aiohttp.ClientSession() as s:
        since = (await checkin(s, relay, "a1"))["generation"]
        waiting = asyncio.create_task(events(s, relay, "a1", since))
        await held(relay, 1)
        hub = relay.app[EVENTS]
        await relay.close()  # runs on_shutdown before waiting for handlers
        assert await waiting == (204, None)
    assert hub.waiting == 0


async def test_keys_an_admin_did_not_set_follow_the_configured_defaults(relay):
    policy = relay_state(relay).policy
    async with aiohttp.ClientSession() as s:
        pilot_since = (await checkin(s, relay, "p1", "pilot"))["generation"]
        status, _ = await put_group(s, relay, "pilot", {"events": False})
        assert status == 200
        pilot_since = (await checkin(s, relay, "p1", "pilot"))["generation"]
        waiting = asyncio.create_task(events(s, relay, "p1", pilot_since))
        await held(relay, 1)
        # The configuration is re-read with another poll interval: every group follows it
        # (the key was never set for them), and their agents are told at once.
        assert policy.set_group_defaults(GroupSettings(poll_seconds=900))
        status, body = await waiting
        assert (status, body["reasons"]) == (200, ["settings"])
        answer = await checkin(s, relay, "p1", "pilot")
        assert (answer["settings"]["poll_seconds"], answer["settings"]["events"]) == (900, False)
        status, _ = await put_group(s, relay, "pilot", {"poll_seconds": 60})
        assert not policy.set_group_defaults(GroupSettings(poll_seconds=900))  # unchanged
        policy.set_group_defaults(GroupSettings(poll_seconds=1200))
        assert policy.group_settings("pilot").poll_seconds == 60  # set by the admin: kept
        assert policy.group_settings("default").poll_seconds == 1200


async def test_a_child_relay_waits_on_its_parent_as_a_relay(serve_relay):
    parent = await serve_relay(name="parent")
    await serve_relay([parent.url], name="child")
    hub = parent.app[EVENTS]
    for _ in range(500):  # bounded: the child's follower holds the parent's events
        if any(c.wave.relays for c in hub._channels.values()):
            break
        await asyncio.sleep(0.01)
    assert [c.wave.relays for c in hub._channels.values()] == [1]
    assert hub.waiting == 1

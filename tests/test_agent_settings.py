"""The reference agent and its group settings, through a real relay: events, schedules,
once-a-day configuration, admin-set actions, uninstall of a declined version, catch-up.

The agent's clock is a value the test sets (schedules are wall-clock rules); nothing is
timed: waits are bounded polls.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import sys

import aiohttp
import pytest

from relay.agent.updater import Agent, AgentConfig
from relay.publisher.repository import Repository
from relay.server.events import EVENTS
from tests.support import Origin, relay_config, relay_state, settle, start_relay, write_root

TOKEN = "agent-settings-token"
TZ = dt.timezone(dt.timedelta(hours=-5))
MONDAY_NOON = dt.datetime(2026, 11, 30, 12, 0, tzinfo=TZ)
OPEN = {"software": True, "content": True, "config": True}


class Clock:
    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def repo(tmp_path):
    repo = Repository.init(tmp_path / "repo")
    repo.add_bytes(b"app one\n" * 500, "app.bin", product="app", version="1.0.0")
    return repo


@pytest.fixture
async def relay(tmp_path, repo, aiohttp_server):
    origin = Origin(repo.public_dir)
    server = await aiohttp_server(origin.app())
    root = write_root(tmp_path, repo.root_bytes(1))
    values = {
        "admin.token": TOKEN,
        "events.hold": 20,
        "events.splay": 0,
        "policy.install_undefined": OPEN,
    }
    relay = await start_relay(
        aiohttp_server, relay_config(tmp_path, [str(server.make_url("/"))], root, **values)
    )
    await settle(relay)
    relay.url = str(relay.make_url("/"))
    relay.root = root
    return relay


def make_agent(tmp_path, relay, name="a1", clock=None, **config):
    marker = tmp_path / f"{name}-actions.txt"
    line = "os.environ['RELAY_PRODUCT'] + ' ' + os.environ['RELAY_VERSION'] + chr(10)"
    record = f"{sys.executable} -c \"import os; open({str(marker)!r}, 'a').write({line})\""
    agent = Agent(
        AgentConfig(
            agent_id=name,
            trusted_root=relay.root,
            state_dir=tmp_path / name / "state",
            install_dir=tmp_path / name / "install",
            relays=(relay.url,),
            request_timeout=5,
            poll_jitter=0,
            actions={"scan-now": record},
            **config,
        ),
        clock=clock or Clock(MONDAY_NOON),
        rng=random.Random(7),
    )
    agent.marker = marker
    return agent


async def run(agent):
    return await asyncio.to_thread(agent.run_once)


async def admin(relay, method, path, body=None):
    async with (
        aiohttp.ClientSession() as s,
        s.request(
            method,
            f"{relay.url.rstrip('/')}{path}",
            json=body,
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as r,
    ):
        assert r.status == 200, await r.text()
        return await r.json()


async def set_group(relay, body, group="default"):
    return await admin(relay, "PUT", f"/v1/admin/groups/{group}/settings", body)


async def publish(relay, repo, data, product, version, kind="software", name="app.bin"):
    repo.add_bytes(data, name, product=product, version=version, kind=kind)
    await settle(relay)


async def held(relay, count=1):
    hub = relay.app[EVENTS]
    for _ in range(1000):
        if hub.waiting >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the agent holds no event request")


async def test_settings_changed_by_the_admin_reach_a_running_agent(tmp_path, relay, repo):
    agent = make_agent(tmp_path, relay)
    assert (await run(agent)).installed == ["app 1.0.0"]
    assert agent.settings.after_install == ()
    waiting = asyncio.create_task(asyncio.to_thread(agent.wait, 30))
    await held(relay)
    await set_group(relay, {"actions": {"after_install": ["scan-now"]}, "poll_seconds": 120})
    assert await waiting == "event"  # woken by the change, well before 600 s
    await run(agent)
    assert agent.settings.after_install == ("scan-now",)
    assert agent.poll_interval() == 120  # poll_jitter is 0 here
    # The admin-set action runs after the next install (once), with the product named.
    await publish(relay, repo, b"app two\n" * 500, "app", "1.1.0")
    assert (await run(agent)).installed == ["app 1.1.0"]
    assert agent.marker.read_text() == "app 1.1.0\n"
    await run(agent)
    assert agent.marker.read_text() == "app 1.1.0\n"
    # Events switched off: the agent just waits out its interval.
    await set_group(relay, {"events": False})
    await run(agent)
    assert not agent.settings.events
    assert await asyncio.to_thread(agent.wait, 0.2) == "poll"
    assert relay.app[EVENTS].waiting == 0


async def test_scheduled_install_waits_for_its_slot_content_goes_at_once(tmp_path, relay, repo):
    window = {"days": [], "start": "22:00", "window": "1h"}
    await set_group(relay, {"schedule": [window], "on_new_content": True}, "office")
    clock = Clock(MONDAY_NOON)
    agent = make_agent(tmp_path, relay, clock=clock, group="office")
    summary = await run(agent)
    assert summary.installed == []
    assert summary.waiting == ["app 1.0.0: waiting for the slot"]
    slot = summary.next_at
    assert slot is not None
    assert MONDAY_NOON.replace(hour=22) <= slot < MONDAY_NOON.replace(hour=23)
    # The agent wakes for its slot, or at its poll interval if that comes first.
    assert agent.next_wait(summary) == min(3600, (slot - MONDAY_NOON).total_seconds())
    # New content passes at once (on_new_content), the software still waits.
    await publish(relay, repo, b"sigs\n" * 100, "sigs", "1.0.0", kind="content", name="s.db")
    clock.now = MONDAY_NOON + dt.timedelta(hours=1)
    summary = await run(agent)
    assert summary.installed == ["sigs 1.0.0"]
    assert summary.next_at == slot  # the same slot: not redrawn
    # Inside the window but before the slot: still waiting; at the slot: installed.
    clock.now = MONDAY_NOON.replace(hour=22)
    if slot > clock.now:
        assert (await run(agent)).installed == []
    clock.now = slot
    assert (await run(agent)).installed == ["app 1.0.0"]
    # Without on_new_content, content waits for the window too.
    await set_group(relay, {"on_new_content": False}, "office")
    await publish(relay, repo, b"sigs 2\n" * 100, "sigs", "1.1.0", kind="content", name="s.db")
    clock.now = MONDAY_NOON + dt.timedelta(days=1)
    summary = await run(agent)
    assert summary.waiting == ["sigs 1.1.0: waiting for the slot"]
    assert summary.next_at is not None
    assert summary.next_at >= clock.now.replace(hour=22)


async def test_a_passed_deadline_overrides_the_schedule(tmp_path, relay, repo):
    window = {"days": ["sun"], "start": "03:00", "window": "1h"}
    await set_group(relay, {"schedule": [window]}, "office")
    await admin(
        relay,
        "PUT",
        "/v1/admin/settings",
        {"rollout_mode": "on-demand", "deferral_days": [1]},
    )
    agent = make_agent(tmp_path, relay, group="office", defer_days=1)
    summary = await run(agent)
    assert summary.installed == []  # on-demand and not due: deferred
    # A day later by the relay's clock: the deadline passed, the offer is forced.
    state = relay_state(relay)
    record = state.registry.get("a1")
    record.first_offered = {k: v - 2 * 86400 for k, v in record.first_offered.items()}
    summary = await run(agent)
    assert summary.installed == ["app 1.0.0"]  # not Sunday 03:00, installed all the same


async def test_configuration_is_applied_at_most_once_a_day(tmp_path, relay, repo):
    await set_group(relay, {"config_once_a_day": True})
    clock = Clock(MONDAY_NOON)
    agent = make_agent(tmp_path, relay, clock=clock)
    await publish(relay, repo, b"conf 1\n", "conf", "1.0.0", kind="config", name="c.toml")
    assert sorted((await run(agent)).installed) == ["app 1.0.0", "conf 1.0.0"]
    await publish(relay, repo, b"conf 2\n", "conf", "1.1.0", kind="config", name="c.toml")
    clock.now = MONDAY_NOON + dt.timedelta(hours=3)
    summary = await run(agent)
    assert summary.waiting == ["conf 1.1.0: config once a day"]
    assert summary.next_at == MONDAY_NOON + dt.timedelta(days=1)
    clock.now = MONDAY_NOON + dt.timedelta(days=1)
    assert (await run(agent)).installed == ["conf 1.1.0"]


async def test_a_declined_version_with_nothing_older_is_uninstalled(tmp_path, relay):
    removal = tmp_path / "removed.txt"
    script = f"import os; open({str(removal)!r}, 'w').write(os.environ['RELAY_FILE'])"
    by_command = make_agent(
        tmp_path, relay, "cmd", uninstall_command=f'{sys.executable} -c "{script}"'
    )
    by_deletion = make_agent(tmp_path, relay, "del")
    for agent in (by_command, by_deletion):
        assert (await run(agent)).installed == ["app 1.0.0"]
    installed_file = by_deletion.installed["app"]["file"]
    await admin(
        relay,
        "POST",
        "/v1/admin/approvals",
        {"product": "app", "version": "1.0.0", "status": "declined"},
    )
    for agent in (by_command, by_deletion):
        summary = await run(agent)
        assert summary.uninstalled == ["app 1.0.0"]
        assert "app" not in agent.installed
        assert agent.state["pending_reports"] == []  # reported
    assert (
        removal.read_text() == by_command.config.install_dir.joinpath("app", "app.bin").as_posix()
    )
    assert not (tmp_path / "del" / "install" / "app" / "app.bin").exists()
    assert installed_file.endswith("app.bin")
    records = {r.agent_id: r for r in relay_state(relay).registry.all()}
    assert records["del"].last_outcome["event"] == "uninstalled"
    assert records["del"].last_outcome["from_version"] == "1.0.0"
    # Nothing left to do afterwards.
    assert (await run(by_deletion)).uninstalled == []


async def test_a_failing_uninstall_command_is_reported_and_keeps_the_version(tmp_path, relay):
    agent = make_agent(
        tmp_path, relay, uninstall_command=f'{sys.executable} -c "raise SystemExit(3)"'
    )
    await run(agent)
    await admin(
        relay,
        "POST",
        "/v1/admin/approvals",
        {"product": "app", "version": "1.0.0", "status": "declined"},
    )
    summary = await run(agent)
    assert summary.failed == ["app : uninstall_failed"]
    assert agent.installed["app"]["version"] == "1.0.0"


async def test_an_agent_that_was_offline_catches_up_at_once(tmp_path, relay, repo):
    agent = make_agent(tmp_path, relay)
    await run(agent)
    # While it is away, two releases are published and verified by the relay.
    await publish(relay, repo, b"app two\n" * 500, "app", "1.1.0")
    await publish(relay, repo, b"app three\n" * 500, "app", "1.2.0")
    # Back: its first event request is answered at once (its generation is old), well
    # before the relay's 20 s hold or its 600 s wait.
    assert await asyncio.to_thread(agent.wait, 30) == "event"
    assert relay.app[EVENTS].waiting == 0
    assert (await run(agent)).installed == ["app 1.2.0"]


async def test_events_that_fail_fall_back_to_polling(tmp_path, relay):
    agent = make_agent(tmp_path, relay)
    await run(agent)
    agent.state["events_relay"] = "http://127.0.0.1:9/"  # nothing listens there
    assert await asyncio.to_thread(agent.wait, 0.3) == "poll"

"""Approvals end to end: agents through a relay, the admin API, the audit log, replicas."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from relay.agent.updater import Agent, AgentConfig
from relay.server.replica import pull_parent_policy
from tests.support import relay_state, released

TOKEN = "t0ken-for-tests"
V1 = b"one" * 20000
V2 = b"two" * 20000
EULA = b"You agree to everything.\n"


@pytest.fixture
def repo(repo):
    return released(repo, V1, "app.bin", product="app", version="1.0.0")


@pytest.fixture
async def relay(serve_relay, root_file):
    relay = await serve_relay(**{"admin.token": TOKEN})
    relay.root = root_file
    return relay


def make_agent(tmp_path, relay, name, group="default"):
    return Agent(
        AgentConfig(
            agent_id=name,
            group=group,
            trusted_root=relay.root,
            state_dir=tmp_path / name / "s",
            install_dir=tmp_path / name / "i",
            relays=(relay.url,),
            request_timeout=5,
        )
    )


async def admin(relay, method, path, body=None, token=TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, relay.make_url(path), json=body, headers=headers) as r,
    ):
        return r.status, (
            await r.json() if r.content_type == "application/json" else await r.text()
        )


async def set_approval(relay, version, status, token=TOKEN, **fields):
    """Set the approval of product ``app`` at ``version`` (``fields``: group...)."""
    body = {"product": "app", "version": version, "status": status, **fields}
    return await admin(relay, "POST", "/v1/admin/approvals", body, token=token)


async def run(agent):
    return await asyncio.to_thread(agent.run_once)


async def test_undefined_software_waits_for_approval_and_audit(tmp_path, relay):
    a = make_agent(tmp_path, relay, "a1")
    s = await run(a)
    assert s.installed == [] and "app" not in a.installed
    status, body = await set_approval(relay, "1.0.0", "approved")
    assert status == 200, body
    s = await run(a)
    assert s.installed == ["app 1.0.0"]
    status, body = await admin(relay, "GET", "/v1/admin/audit")
    assert [e["action"] for e in body["audit"]] == ["set-approved"]
    assert body["audit"][0]["product"] == "app" and body["audit"][0]["from"] == "127.0.0.1"
    status, body = await admin(relay, "GET", "/v1/admin/agents")
    assert body["agents"][0]["agent_id"] == "a1"
    assert body["agents"][0]["last_outcome"]["event"] == "installed"


async def test_pilot_ring_then_decline_moves_back(tmp_path, repo, relay):
    await set_approval(relay, "1.0.0", "approved")
    pilot, other = make_agent(tmp_path, relay, "p1", "pilot"), make_agent(tmp_path, relay, "d1")
    await run(pilot)
    await run(other)
    repo.add_bytes(V2, "app.bin", product="app", version="1.1.0")
    await relay_state(relay).mirror.sync_once()
    status, _ = await set_approval(relay, "1.1.0", "approved", group="pilot")
    assert status == 200
    assert (await run(pilot)).installed == ["app 1.1.0"]
    assert (await run(other)).installed == []
    assert other.installed["app"]["version"] == "1.0.0"
    # Declined after install: pilot agents move back to the newest approved version.
    status, _ = await set_approval(relay, "1.1.0", "declined", group="pilot")
    assert status == 200
    s = await run(pilot)
    assert s.installed == ["app 1.0.0"]
    assert pilot.installed["app"]["version"] == "1.0.0"
    assert (tmp_path / "p1" / "i" / "app" / "app.bin").read_bytes() == V1
    _, body = await admin(relay, "GET", "/v1/admin/audit")
    assert [e["action"] for e in body["audit"]] == ["set-approved", "set-approved", "set-declined"]


async def test_eula_must_be_accepted_before_approval(tmp_path, repo, relay):
    repo.add_bytes(EULA, "eula.txt", product="legal", version="1.0.0", kind="config")
    repo.add_bytes(V2, "app.bin", product="app", version="2.0.0", eula="legal/1.0.0/eula.txt")
    await relay_state(relay).mirror.sync_once()
    body = {"product": "app", "version": "2.0.0", "status": "approved"}
    status, err = await admin(relay, "POST", "/v1/admin/approvals", body)
    assert status == 409 and "EULA" in err["error"]
    status, text = await admin(relay, "GET", "/v1/admin/eulas/legal/1.0.0/eula.txt")
    assert status == 200 and text == EULA.decode()
    status, _ = await admin(relay, "POST", "/v1/admin/eulas", {"path": "legal/1.0.0/eula.txt"})
    assert status == 200
    status, _ = await admin(relay, "POST", "/v1/admin/approvals", body)
    assert status == 200
    a = make_agent(tmp_path, relay, "a1")
    assert "app 2.0.0" in (await run(a)).installed
    _, audit = await admin(relay, "GET", "/v1/admin/audit")
    actions = [e["action"] for e in audit["audit"]]
    assert actions == ["refused-approval", "accept-eula", "set-approved"]


@pytest.mark.parametrize("token", [None, "wrong"])
async def test_admin_without_or_with_wrong_token_is_401_and_changes_nothing(relay, token):
    state = relay_state(relay)
    before = state.policy.export()
    for method, path, body in [
        (
            "POST",
            "/v1/admin/approvals",
            {"product": "app", "version": "1.0.0", "status": "approved"},
        ),
        ("PUT", "/v1/admin/settings", {"relays_only": True}),
        ("GET", "/v1/admin/policy", None),
    ]:
        status, _ = await admin(relay, method, path, body, token=token)
        assert status == 401
    assert state.policy.export() == before
    # Each refusal is recorded (in the background), and nothing else.
    for _ in range(100):
        if len(await state.policy.audit_log()) == 3:
            break
        await asyncio.sleep(0.02)
    entries = await state.policy.audit_log()
    assert [(e["action"], e["from"]) for e in entries] == [("refused-sign-in", "127.0.0.1")] * 3


async def test_settings_change_and_bad_body(relay):
    status, body = await admin(
        relay, "PUT", "/v1/admin/settings", {"relays_only": True, "beta_groups": ["pilot"]}
    )
    assert status == 200 and body["relays_only"] is True
    status, body = await admin(relay, "PUT", "/v1/admin/settings", {"rollout_mode": "soonish"})
    assert status == 400 and "rollout_mode" in body["error"]
    status, body = await set_approval(relay, "1.0.0", "maybe")
    assert status == 400


async def test_replica_follows_parent_and_refuses_local_changes(tmp_path, repo, relay, serve_relay):
    token_file = tmp_path / "parent-token"
    token_file.write_text(TOKEN + "\n")
    replica = await serve_relay(
        [relay.url],
        name="replica",
        **{
            "policy.mode": "replica",
            "policy.parent_url": relay.url,
            "policy.parent_token_file": str(token_file),
            "admin.token": "replica-token",
        },
    )
    await set_approval(relay, "1.0.0", "approved")
    status, _ = await admin(
        relay, "PUT", "/v1/admin/groups/pilot/settings", {"poll_seconds": 900, "events": False}
    )
    assert status == 200
    rstate = relay_state(replica)
    parent = rstate.upstream.with_base_url(rstate.config.policy.parent_url)
    assert await pull_parent_policy(rstate.config, parent, rstate.policy) is True
    assert rstate.policy.export() == relay_state(relay).policy.export()
    assert rstate.policy.group_settings("pilot").poll_seconds == 900  # group settings too
    assert await pull_parent_policy(rstate.config, parent, rstate.policy) is False
    status, _ = await admin(
        replica, "PUT", "/v1/admin/groups/pilot/settings", {"events": True}, token="replica-token"
    )
    assert status == 409
    status, body = await set_approval(replica, "1.0.0", "declined", token="replica-token")
    assert status == 409
    replica.url = str(replica.make_url("/"))
    replica.root = relay.root
    a = make_agent(tmp_path, replica, "r1")
    assert (await run(a)).installed == ["app 1.0.0"]


async def test_admin_cli_tables(tmp_path, relay, capsys, monkeypatch):
    from relay.cli.main import main

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    base = ["admin", "--url", relay.url, "--token-file", str(token_file)]

    def cli(*argv):
        return main([*base, *argv])

    assert (
        await asyncio.to_thread(cli, "approve", "app", "1.0.0", "--group", "pilot", "--new-group")
        == 0
    )
    assert await asyncio.to_thread(cli, "updates") == 0
    out = capsys.readouterr().out
    assert "app 1.0.0: approved for pilot" in out
    assert "pilot=approved" in out and "default=undefined" in out
    assert await asyncio.to_thread(cli, "settings", "--set", "relays_only=true") == 0
    assert re.search(r"relays_only +true", capsys.readouterr().out)
    assert await asyncio.to_thread(cli, "audit") == 0
    assert "set-approved" in capsys.readouterr().out
    monkeypatch.delenv("RELAY_ADMIN_TOKEN", raising=False)
    assert await asyncio.to_thread(main, ["admin", "--url", relay.url, "agents"]) == 3
    token_file.write_text("wrong")
    assert await asyncio.to_thread(cli, "agents") == 1
    assert "HTTP 401" in capsys.readouterr().err


async def test_admin_cli_errors_name_the_request_or_the_connection(tmp_path, relay, capsys):
    from relay.cli.main import main

    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    base = ["admin", "--token-file", str(token_file)]
    # The relay's own message, after the method, path and status.
    argv = [*base, "--url", relay.url, "approve", "app", "9.9.9"]
    assert await asyncio.to_thread(main, argv) == 1
    err = capsys.readouterr().err
    assert re.match(r"relay: error: POST /v1/admin/approvals: HTTP 4\d\d: \S", err), err
    assert "{" not in err  # the JSON body's "error", not the body
    # No relay there: the URL and what the system said, no traceback.
    dead = "http://127.0.0.1:9/"
    assert await asyncio.to_thread(main, [*base, "--url", dead, "agents"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"relay: error: {dead}: cannot connect: ")
    assert "Connection refused" in err and "Traceback" not in err
    # A malformed --set is a configuration error (exit 3), sent nowhere.
    argv = [*base, "--url", relay.url, "settings", "--set", "relays_only"]
    assert await asyncio.to_thread(main, argv) == 3
    assert "expected KEY=JSON" in capsys.readouterr().err
    assert await asyncio.to_thread(main, [*base, "--url", relay.url, "sync"]) == 0
    assert capsys.readouterr().out.strip()

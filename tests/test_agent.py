"""The reference agent through real relays: delta and full updates, failover, reports."""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest

from relay.agent.updater import Agent, AgentConfig
from relay.core.protocol import DeltaFormat
from relay.publisher.repository import Repository
from tests.support import Fault, relay_config, relay_state, settle, start_relay, write_root


def _release(seed: int, base: bytes | None = None, size: int = 1_200_000) -> bytes:
    rng = random.Random(seed)
    if base is None:
        return rng.randbytes(size)
    new = bytearray(base)
    for _ in range(10):
        at = rng.randrange(len(new) - 64)
        new[at : at + 32] = rng.randbytes(32)
    return bytes(new)


V1 = _release(1)
V2 = _release(2, V1)
V3 = _release(3, V2)
OPEN_POLICY = {"policy.install_undefined": {"software": True, "content": True, "config": True}}


@pytest.fixture
def repo(tmp_path):
    repo = Repository.init(tmp_path / "repo")
    repo.add_bytes(V1, "app.bin", product="app", version="1.0.0", actions=["scan-now"])
    return repo


@pytest.fixture
async def origin(repo, serve_origin):
    return await serve_origin(repo)


@pytest.fixture
async def relay(tmp_path, repo, origin, aiohttp_server):
    root = write_root(tmp_path, repo.root_bytes(1))
    relay = await start_relay(
        aiohttp_server, relay_config(tmp_path, [origin.url], root, **OPEN_POLICY)
    )
    await settle(relay)
    relay.url = str(relay.make_url("/"))
    return relay


def make_agent(tmp_path, repo, name="a1", **kw) -> Agent:
    root = tmp_path / "agent-root.json"
    root.write_bytes(repo.root_bytes(1))
    cfg = AgentConfig(
        agent_id=name,
        trusted_root=root,
        state_dir=tmp_path / name / "state",
        install_dir=tmp_path / name / "install",
        request_timeout=5,
        **kw,
    )
    return Agent(cfg)


async def run(agent):
    return await asyncio.to_thread(agent.run_once)


async def publish_and_diff(repo, relay, data, version):
    target = repo.add_bytes(data, "app.bin", product="app", version=version, actions=["scan-now"])
    state = relay_state(relay)
    await state.mirror.sync_once()
    for _ in range(3000):
        olds = [t for t in state.mirror.current.products()["app"] if t.sha256 != target.sha256]
        if all(
            state.deltas.lookup(o.sha256, target.sha256, [f])
            for o in olds[-1:]
            for f in DeltaFormat
        ):
            break
        await asyncio.sleep(0.01)
    return target


async def test_install_then_upgrade_by_delta_and_reports(tmp_path, repo, relay):
    agent = make_agent(tmp_path, repo, relays=(relay.url,))
    s = await run(agent)
    assert s.installed == ["app 1.0.0"], s
    installed = agent.installed["app"]
    assert (tmp_path / "a1" / "install" / "app" / "app.bin").read_bytes() == V1
    await publish_and_diff(repo, relay, V2, "1.1.0")
    s = await run(agent)
    assert s.installed == ["app 1.1.0"], s
    assert [o.via for o in s.outcomes if o.event == "installed"] == ["delta"]
    assert (tmp_path / "a1" / "install" / "app" / "app.bin").read_bytes() == V2
    assert agent.installed["app"]["sha256"] == hashlib.sha256(V2).hexdigest() != installed["sha256"]
    state = relay_state(relay)
    record = state.registry.get("a1")
    assert record.last_outcome["event"] == "installed" and record.last_outcome["via"] == "delta"
    # The installed report updates the registry before the next check-in.
    assert record.installed == [
        {"product": "app", "version": "1.1.0", "sha256": agent.installed["app"]["sha256"]}
    ]
    text = state.metrics.render().decode()
    assert 'relay_agent_events_total{event="installed",reason=""} 2.0' in text
    assert "relay_delta_bytes_served_total" in text


async def test_full_download_when_no_delta_and_tampered_delta_rejected(tmp_path, repo, relay):
    agent = make_agent(tmp_path, repo, relays=(relay.url,), accept_delta=())
    await run(agent)
    await publish_and_diff(repo, relay, V2, "1.1.0")
    s = await run(agent)
    assert [o.via for o in s.outcomes if o.event == "installed"] == ["full"]

    # A tampered patch on the relay's disk: the agent refuses it, uses the full target, reports.
    agent2 = make_agent(tmp_path, repo, name="a2", relays=(relay.url,))
    repo_v1 = repo.targets()[0]
    state = relay_state(relay)
    # Install v1 on agent2 by pinning it before v2 is visible: easiest is a fresh agent with v1 file.
    agent2.installed["app"] = {
        "version": "1.0.0",
        "sha256": repo_v1.sha256,
        "file": str(tmp_path / "v1.bin"),
        "target": repo_v1.path,
    }
    (tmp_path / "v1.bin").write_bytes(V1)
    v2 = [t for t in repo.targets() if t.version == "1.1.0"][0]
    for fmt in DeltaFormat:
        patch = state.deltas.lookup(repo_v1.sha256, v2.sha256, [fmt])
        data = bytearray(patch.path.read_bytes())
        data[-20] ^= 0xFF
        patch.path.write_bytes(bytes(data))
    s = await run(agent2)
    assert s.installed == ["app 1.1.0"]
    assert [(o.event, o.reason) for o in s.outcomes][:1] == [("failed", "delta_rejected")]
    assert [o.via for o in s.outcomes if o.event == "installed"] == ["full"]
    assert (tmp_path / "a2" / "install" / "app" / "app.bin").read_bytes() == V2
    text = state.metrics.render().decode()
    assert 'relay_agent_events_total{event="failed",reason="delta_rejected"} 1.0' in text


async def test_failover_to_second_relay(tmp_path, repo, relay):
    dead = "http://127.0.0.1:9/"
    agent = make_agent(tmp_path, repo, relays=(dead, relay.url))
    s = await run(agent)
    assert s.source == relay.url
    assert s.installed == ["app 1.0.0"]


async def test_relays_only_never_touches_origin(tmp_path, repo, origin):
    dead = "http://127.0.0.1:9/"
    agent = make_agent(tmp_path, repo, relays=(dead,), origin=origin.url, relays_only=True)
    s = await run(agent)
    assert origin.hits == {}
    assert "relays-only" in s.error
    assert agent.state["pending_reports"][-1]["reason"] == "relays_unreachable"
    # Without relays-only, the origin is used (software too, where the agent allows it).
    agent = make_agent(
        tmp_path,
        repo,
        name="a2",
        relays=(dead,),
        origin=origin.url,
        install_undefined=("content", "software"),
    )
    s = await run(agent)
    assert s.source == origin.url
    assert s.installed == ["app 1.0.0"]
    assert origin.hits


async def test_rollback_protection_survives_restart(tmp_path, repo, origin):
    old_ts = (repo.metadata_dir / "timestamp.json").read_bytes()
    repo.refresh()
    kinds = ("content", "software")
    agent = make_agent(tmp_path, repo, origin=origin.url, install_undefined=kinds)
    s = await run(agent)
    assert s.installed == ["app 1.0.0"]
    agent.close()
    origin.faults["metadata/timestamp.json"] = Fault(body=old_ts)
    restarted = make_agent(tmp_path, repo, origin=origin.url, install_undefined=kinds)
    s = await run(restarted)
    assert "metadata refresh" in s.error
    assert restarted.state["pending_reports"][-1]["reason"] == "metadata_rejected"


@pytest.mark.parametrize(
    ("command", "timeout", "reason"),
    [("false", 10, "install_failed"), ("sleep 5", 0.3, "install_timeout")],
)
async def test_failed_install_command_keeps_previous_version(
    tmp_path, repo, relay, command, timeout, reason
):
    agent = make_agent(tmp_path, repo, relays=(relay.url,))
    await run(agent)
    bad = make_agent(
        tmp_path, repo, relays=(relay.url,), install_command=command, install_timeout=timeout
    )
    await publish_and_diff(repo, relay, V2, "1.1.0")
    s = await run(bad)
    assert s.failed == [f"app 1.1.0: {reason}"]
    assert bad.installed["app"]["version"] == "1.0.0"
    assert (tmp_path / "a1" / "install" / "app" / "app.bin").read_bytes() == V1
    await asyncio.sleep(0)
    record = relay_state(relay).registry.get("a1")
    assert record.last_outcome["event"] == "failed" and record.last_outcome["reason"] == reason


async def test_post_install_action_runs_once(tmp_path, repo, relay):
    counter = tmp_path / "scans.txt"
    agent = make_agent(
        tmp_path,
        repo,
        relays=(relay.url,),
        actions={"scan-now": f"sh -c 'echo $RELAY_VERSION >> {counter}'"},
    )
    await run(agent)
    await run(agent)
    await run(
        make_agent(
            tmp_path,
            repo,
            relays=(relay.url,),
            actions={"scan-now": f"sh -c 'echo $RELAY_VERSION >> {counter}'"},
        )
    )
    assert counter.read_text() == "1.0.0\n"


async def test_relay_agent_cli_from_flags_alone(tmp_path, repo, relay, capsys):
    from relay.cli.main import main

    root = tmp_path / "root.json"
    root.write_bytes(repo.root_bytes(1))
    argv = [
        "agent",
        "--relay",
        "http://127.0.0.1:9/",
        "--relay",
        relay.url,
        "--trusted-root",
        str(root),
        "--state-dir",
        str(tmp_path / "cli" / "s"),
        "--install-dir",
        str(tmp_path / "cli" / "i"),
        "--id",
        "cli-1",
        "--group",
        "default",
        "--defer",
        "3",
        "--once",
    ]
    assert await asyncio.to_thread(main, argv) == 0
    assert "installed app 1.0.0" in capsys.readouterr().out
    assert (tmp_path / "cli" / "i" / "app" / "app.bin").read_bytes() == V1
    assert await asyncio.to_thread(main, argv) == 0
    assert "up to date" in capsys.readouterr().out
    assert relay_state(relay).registry.get("cli-1").defer_days == 3
    # Without a trusted root: a configuration error naming the key (exit 3).
    assert await asyncio.to_thread(main, ["agent", "--relay", relay.url, "--once"]) == 3
    assert "agent.trusted_root" in capsys.readouterr().err


def test_config_from_settings_carries_every_agent_key(tmp_path):
    import dataclasses
    import socket
    from pathlib import Path

    from relay.config import load_config

    config = load_config(
        None,
        {},
        {
            "agent.id": "host-7",
            "agent.relays": ["http://r1/", "http://r2/"],
            "agent.trusted_root": str(tmp_path / "root.json"),
            "agent.defer_days": 3,
            "agent.poll_jitter": 5.0,
            "agent.request_timeout": 7.5,
        },
    )
    settings = config.agent
    cfg = AgentConfig.from_settings(settings)
    # Every [agent] key has a field of the same name (id is agent_id), with its value.
    for f in dataclasses.fields(settings):
        name = "agent_id" if f.name == "id" else f.name
        assert getattr(cfg, name) == getattr(settings, f.name), name
    assert (cfg.agent_id, cfg.relays, cfg.defer_days) == ("host-7", ("http://r1/", "http://r2/"), 3)
    assert cfg.trusted_root == Path(tmp_path / "root.json")
    # No id: the host name. Overrides win.
    default = AgentConfig.from_settings(load_config(None, {}, {}).agent, group="pilot")
    assert (default.agent_id, default.group) == (socket.gethostname(), "pilot")


async def test_poll_interval_follows_the_relay_plus_jitter(tmp_path, repo, relay):
    agent = make_agent(tmp_path, repo, relays=(relay.url,), poll_jitter=0.0)
    from relay.agent.updater import DEFAULT_POLL

    assert agent.poll_interval() == DEFAULT_POLL  # no answer yet
    await run(agent)
    poll = agent.state["relay_answer"]["poll_seconds"]
    assert isinstance(poll, int)
    assert agent.poll_interval() == poll
    jittery = make_agent(tmp_path, repo, name="a2", relays=(relay.url,), poll_jitter=30.0)
    assert DEFAULT_POLL <= jittery.poll_interval() <= DEFAULT_POLL + 30.0

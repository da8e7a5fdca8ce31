"""Agents obey the policy without a relay: real relay and agent processes, relay up then down.

- An agent that never reached a relay installs from the origin only the kinds its own
  ``install_undefined`` allows (content flows, software waits for an approval).
- An agent that checked in installs from the origin, while its relays are down, only
  what its last check-in answer offered it: never a declined version, never a version
  nobody approved.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

import aiohttp
import pytest

from relay.publisher.repository import Repository
from tests.support import free_port, start_relay_process, write_root

TOKEN = "fallback-token"


async def _agent(tmp_path, name, *, relay, origin, root) -> dict:
    """Run ``relay agent --once`` in its own process; return its installed products."""
    state = tmp_path / name / "state"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay.cli.main",
        "agent",
        "--relay",
        relay,
        "--origin",
        origin,
        "--trusted-root",
        str(root),
        "--state-dir",
        str(state),
        "--install-dir",
        str(tmp_path / name / "install"),
        "--id",
        name,
        "--once",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "RELAY_AGENT__REQUEST_TIMEOUT": "30"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode in (0, 1), err.decode()[-2000:]
    data = json.loads((state / "agent.json").read_text())
    return {p: i["version"] for p, i in data["installed"].items()}


async def _admin(port, body) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"http://127.0.0.1:{port}/v1/admin/approvals",
            json=body,
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as r,
    ):
        assert r.status == 200, await r.text()


@pytest.mark.slow
@pytest.mark.timeout(240)
async def test_agents_follow_the_policy_with_the_relay_up_then_down(tmp_path, serve_static):
    repo = Repository.init(tmp_path / "repo")
    repo.add_bytes(b"app-1" * 1000, "app.bin", product="app", version="1.0.0")
    repo.add_bytes(b"sigs-1" * 1000, "sigs.db", product="sigs", version="1.0.0", kind="content")
    repo.add_bytes(b"sigs-2" * 1000, "sigs.db", product="sigs", version="2.0.0", kind="content")
    origin = await serve_static(repo.public_dir)
    root = write_root(tmp_path, repo.root_bytes(1))
    dead_relay = f"http://127.0.0.1:{free_port()}/"

    # Never reached a relay: content flows, software (undefined) waits.
    fresh = await _agent(tmp_path, "fresh", relay=dead_relay, origin=origin, root=root)
    assert fresh == {"sigs": "2.0.0"}

    # The relay decides: app 1.0.0 approved, sigs 2.0.0 declined.
    token = tmp_path / "token"
    token.write_text(TOKEN)
    port = free_port()
    proc = await start_relay_process(
        [
            "--upstream",
            origin,
            "--trusted-root",
            str(root),
            "--data-dir",
            str(tmp_path / "relay"),
        ],
        port,
        env={"RELAY_ADMIN__TOKEN_FILE": str(token)},
    )
    relay = f"http://127.0.0.1:{port}/"
    try:
        await _admin(port, {"product": "app", "version": "1.0.0", "status": "approved"})
        await _admin(port, {"product": "sigs", "version": "2.0.0", "status": "declined"})
        managed = await _agent(tmp_path, "managed", relay=relay, origin=origin, root=root)
        assert managed == {"app": "1.0.0", "sigs": "1.0.0"}
        # The fresh agent reaches the relay: it moves back from the declined version.
        fresh = await _agent(tmp_path, "fresh", relay=relay, origin=origin, root=root)
        assert fresh == {"app": "1.0.0", "sigs": "1.0.0"}
    finally:
        proc.terminate()
        await proc.wait()

    # The relay is down and the vendor publishes more: an undefined app 2.0.0 and a
    # newer content version. Without its relay, the agent keeps to its last answer.
    repo.add_bytes(b"app-2" * 1000, "app.bin", product="app", version="2.0.0")
    repo.add_bytes(b"sigs-3" * 1000, "sigs.db", product="sigs", version="3.0.0", kind="content")
    managed = await _agent(tmp_path, "managed", relay=relay, origin=origin, root=root)
    assert managed == {"app": "1.0.0", "sigs": "1.0.0"}  # no app 2.0.0, no sigs 2 or 3
    # A new agent that never reached a relay takes only content, and the newest.
    newcomer = await _agent(tmp_path, "newcomer", relay=relay, origin=origin, root=root)
    assert newcomer == {"sigs": "3.0.0"}

"""A small fleet for report, status page and monitoring tests: a relay with an admin
token and real reference agents that install, fail, defer and wait."""

from __future__ import annotations

import asyncio
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from relay.agent.updater import Agent, AgentConfig
from relay.core.protocol import DeltaFormat
from relay.publisher.repository import Repository
from tests.support import Origin, relay_config, relay_state, settle, start_relay, write_root

TOKEN = "fleet-t0ken-for-tests"
_rng = random.Random(7)
V1 = _rng.randbytes(200_000)
V2 = bytearray(V1)
V2[1000:1032] = _rng.randbytes(32)
V2 = bytes(V2)
# The failing install command writes a message with a comma, quotes and a newline.
FAIL = f'{sys.executable} -c "import sys; sys.stderr.write(\'disk full, \\"C:\\" \\nretry later\'); sys.exit(3)"'


@dataclass
class Fleet:
    tmp_path: Path
    repo: Repository
    relay: Any
    root: Path
    agents: dict[str, Agent] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return str(self.relay.make_url("/"))

    def agent(self, name: str, group: str = "default", **kw: Any) -> Agent:
        agent = Agent(
            AgentConfig(
                agent_id=name,
                group=group,
                trusted_root=self.root,
                state_dir=self.tmp_path / "agents" / name / "s",
                install_dir=self.tmp_path / "agents" / name / "i",
                relays=(self.url,),
                request_timeout=5,
                **kw,
            )
        )
        self.agents[name] = agent
        return agent

    async def run(self, name: str) -> Any:
        return await asyncio.to_thread(self.agents[name].run_once)

    async def admin(self, method: str, path: str, body: Any = None, token: str | None = TOKEN):
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with (
            aiohttp.ClientSession() as s,
            s.request(method, self.relay.make_url(path), json=body, headers=headers) as r,
        ):
            text = await r.text()
            if r.content_type == "application/json":
                return r.status, json.loads(text), r.headers
            return r.status, text, r.headers

    async def approve(self, version: str, group: str | None = None, mode: str = "forced"):
        body = {"product": "app", "version": version, "status": "approved", "mode": mode}
        if group is not None:
            body["group"] = group
        status, answer, _ = await self.admin("POST", "/v1/admin/approvals", body)
        assert status == 200, answer

    async def publish(self, data: bytes, version: str, *, wait_deltas: bool = True) -> None:
        target = self.repo.add_bytes(data, "app.bin", product="app", version=version)
        state = relay_state(self.relay)
        await state.mirror.sync_once()
        await state.mirror.prefetch_now()
        if not wait_deltas:
            return
        for _ in range(3000):
            olds = [t for t in state.mirror.current.products()["app"] if t.sha256 != target.sha256]
            if all(state.deltas.lookup(o.sha256, target.sha256, list(DeltaFormat)) for o in olds):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the relay computed no delta")


async def start_fleet(tmp_path: Path, aiohttp_server: Any, **overrides: Any) -> Fleet:
    """A relay with the admin token, serving ``app 1.0.0`` (software: waits for approval)."""
    repo = Repository.init(tmp_path / "repo")
    repo.add_bytes(V1, "app.bin", product="app", version="1.0.0")
    origin = Origin(repo.public_dir)
    server = await aiohttp_server(origin.app())
    root = write_root(tmp_path, repo.root_bytes(1))
    relay = await start_relay(
        aiohttp_server,
        relay_config(
            tmp_path,
            [str(server.make_url("/"))],
            root,
            **{"admin.token": TOKEN, **overrides},
        ),
    )
    await settle(relay)
    return Fleet(tmp_path, repo, relay, root)


async def populate(fleet: Fleet) -> None:
    """ok installs 1.0.0; broken fails to; lazy (group lab, on-demand) defers; new waits."""
    fleet.agent("ok")
    fleet.agent("broken", install_command=FAIL)
    fleet.agent("lazy", group="lab", defer_days=3)
    fleet.agent("new", group="lab")
    await fleet.approve("1.0.0")
    await fleet.approve("1.0.0", group="lab", mode="on-demand")
    for name in ("ok", "broken", "lazy"):
        await fleet.run(name)
    # "new" checks in but has not acted yet: pending.
    await asyncio.to_thread(fleet.agents["new"].checkin)

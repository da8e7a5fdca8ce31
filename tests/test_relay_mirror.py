"""A verifying mirror: stock TUF clients through one relay and a chain of two."""

from __future__ import annotations

import asyncio
import hashlib
import os

import aiohttp
import pytest

from relay.publisher.repository import Repository
from tests.support import (
    Fault,
    TufClient,
    relay_config,
    relay_state,
    settle,
    start_relay,
    write_root,
)

BLOB_A = os.urandom(300_000)
BLOB_B = os.urandom(70_000)


@pytest.fixture
def repo(repo):
    repo.add_bytes(BLOB_A, "agent.bin", product="agent", version="1.0.0")
    repo.add_bytes(
        BLOB_B,
        "sigs.db",
        product="sigs",
        version="2024.1.0",
        kind="content",
        severity="critical",
        actions=["scan-now"],
    )
    return repo


async def test_tuf_client_through_relay_each_blob_fetched_once(tmp_path, repo, origin, serve_relay):
    relay = await serve_relay()
    base = str(relay.make_url("/"))
    for n in range(2):
        client = TufClient(tmp_path / f"client{n}", base, repo.root_bytes(1))
        got = await client.arefresh_and_download()
        assert got["agent/1.0.0/agent.bin"][0] == BLOB_A
        assert got["sigs/2024.1.0/sigs.db"][0] == BLOB_B
        custom = got["sigs/2024.1.0/sigs.db"][1]
        assert custom["kind"] == "content"
        assert custom["actions"] == ["scan-now"]
    for target in repo.targets():
        assert origin.hits[f"targets/{target.url_path}"] == 1, target.path


async def test_cold_relay_fetches_on_first_request(tmp_path, repo, origin, serve_relay):
    relay = await serve_relay(**{"sync.prefetch": "none"})
    assert origin.target_hits() == 0
    client = TufClient(tmp_path / "client", str(relay.make_url("/")), repo.root_bytes(1))
    got = await client.arefresh_and_download()
    assert got["agent/1.0.0/agent.bin"][0] == BLOB_A
    assert origin.target_hits() == 2
    state = relay_state(relay)
    assert state.mirror.store.contains(hashlib.sha256(BLOB_A).hexdigest())


async def test_chain_of_two_relays(tmp_path, repo, origin, serve_relay):
    parent = await serve_relay(name="parent", **{"sync.prefetch": "none"})
    child = await serve_relay([parent.url], name="child", **{"sync.prefetch": "none"})
    for n in range(3):
        client = TufClient(tmp_path / f"c{n}", str(child.make_url("/")), repo.root_bytes(1))
        got = await client.arefresh_and_download()
        assert got["agent/1.0.0/agent.bin"][0] == BLOB_A
    for target in repo.targets():
        assert origin.hits[f"targets/{target.url_path}"] == 1


async def test_new_version_and_root_rotation_followed(tmp_path, repo, serve_relay):
    relay = await serve_relay()
    client = TufClient(tmp_path / "client", str(relay.make_url("/")), repo.root_bytes(1))
    await client.arefresh_and_download()

    repo.rotate("root")
    repo.rotate("timestamp")
    new_blob = os.urandom(50_000)
    repo.add_bytes(new_blob, "agent.bin", product="agent", version="1.1.0")
    await settle(relay)
    state = relay_state(relay)
    assert state.mirror.current.root_version == 3  # each rotation signs a new root
    # The relay serves every root it walked, byte-for-byte.
    for version in (1, 2, 3):
        resp = await relay_client_get(relay, f"/metadata/{version}.root.json")
        assert resp == repo.root_bytes(version)
    got = await client.arefresh_and_download()
    assert got["agent/1.1.0/agent.bin"][0] == new_blob
    # A fresh client that ships only the first root walks forward through the relay.
    fresh = TufClient(tmp_path / "fresh", str(relay.make_url("/")), repo.root_bytes(1))
    got = await fresh.arefresh_and_download()
    assert got["agent/1.1.0/agent.bin"][0] == new_blob


async def relay_client_get(server, path: str) -> bytes:
    async with aiohttp.ClientSession() as session, session.get(server.make_url(path)) as resp:
        assert resp.status == 200, (path, resp.status)
        return await resp.read()


async def test_failover_and_outage(tmp_path, repo, origin, serve_origin, serve_relay):
    down = await serve_origin(repo)
    down.down = True
    relay = await serve_relay([down.url, origin.url])
    assert down.hits  # tried first
    client = TufClient(tmp_path / "client", str(relay.make_url("/")), repo.root_bytes(1))
    got = await client.arefresh_and_download()
    assert got["agent/1.0.0/agent.bin"][0] == BLOB_A

    # Every upstream down: cached targets are still served, /readyz says why.
    origin.down = True
    state = relay_state(relay)
    await state.mirror.sync_once()
    async with aiohttp.ClientSession() as session:
        async with session.get(relay.make_url("/readyz")) as resp:
            body = await resp.json()
            assert resp.status == 200
            assert body["ready"] is True
            assert body["last_sync_error"]
            assert "upstream unreachable" in body["degraded"]
            assert body["expires_in_seconds"] > 0
            assert all(not u["ok"] for u in body["upstreams"])
        async with session.get(relay.make_url("/metrics")) as resp:
            text = await resp.text()
            assert 'relay_sync_runs_total{result="failed"}' in text
            assert "relay_timestamp_expiry_seconds" in text
    again = TufClient(tmp_path / "again", str(relay.make_url("/")), repo.root_bytes(1))
    got = await again.arefresh_and_download()
    assert got["sigs/2024.1.0/sigs.db"][0] == BLOB_B


async def test_relay_pinned_to_a_newer_root_serves_the_older_chain(tmp_path, repo, serve_relay):
    repo.rotate("root")
    repo.rotate("root")
    pinned = write_root(tmp_path, repo.root_bytes(3), "pinned-3.json")
    relay = await serve_relay(trusted_root=pinned)
    for version in (1, 2, 3):
        assert await relay_client_get(relay, f"/metadata/{version}.root.json") == repo.root_bytes(
            version
        )
    # An agent that ships the first root walks forward through the relay.
    client = TufClient(tmp_path / "old-agent", str(relay.make_url("/")), repo.root_bytes(1))
    got = await client.arefresh_and_download()
    assert got["agent/1.0.0/agent.bin"][0] == BLOB_A


async def test_older_roots_that_do_not_chain_to_the_pinned_root_are_not_served(
    tmp_path, repo, origin, serve_relay
):
    repo.rotate("root")
    other = Repository.init(tmp_path / "other")  # a root 1 of someone else
    origin.faults["metadata/1.root.json"] = Fault(body=other.root_bytes(1))
    pinned = write_root(tmp_path, repo.root_bytes(2), "pinned-2.json")
    relay = await serve_relay(trusted_root=pinned)
    state = relay_state(relay)
    assert state.mirror.current is not None
    assert state.mirror.metadata_file("1.root.json") is None
    assert state.mirror.metadata_file("2.root.json") == repo.root_bytes(2)


async def test_readyz_is_503_once_the_served_timestamp_has_expired(
    tmp_path, serve_origin, aiohttp_server
):
    # A timestamp that lasts two seconds: agents refuse expired metadata, so the relay
    # must stop calling itself ready once it expired, and say why.
    repo = Repository.init(tmp_path / "short", expires={"timestamp": 2})
    repo.add_bytes(BLOB_B, "sigs.db", product="sigs", version="1.0.0", kind="content")
    origin = await serve_origin(repo)
    root = write_root(tmp_path, repo.root_bytes(1), "short-root.json")
    relay = await start_relay(aiohttp_server, relay_config(tmp_path, [origin.url], root))
    async with aiohttp.ClientSession() as session:
        async with session.get(relay.make_url("/readyz")) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["reason"] is None
        for _ in range(100):  # bounded: the timestamp expires within 2 s
            async with session.get(relay.make_url("/readyz")) as resp:
                if resp.status == 503:
                    body = await resp.json()
                    break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("/readyz stayed 200 after the timestamp expired")
    assert body["ready"] is False
    assert "expired" in body["reason"]
    assert body["expires_in_seconds"] <= 0

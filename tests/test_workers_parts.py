"""The parts behind ``relay.workers``, one by one: what a leader gives its workers, how they
follow it, and what its private socket honours (and TCP does not)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from relay.cache.mirror import StoredMetadata
from relay.config import config_from_dict, config_to_dict, load_config
from relay.errors import ConfigError
from relay.server.http import CLIENT_ADDRESS_HEADER, via_worker
from relay.server.internal import (
    CHANGES,
    CHANGES_PATH,
    GONE_KEPT,
    Changes,
    changes,
    from_workers,
)
from relay.server.supervisor import worker_environment
from tests.support import free_port, relay_state


def test_the_configuration_goes_to_workers_and_back_unchanged(tmp_path):
    path = tmp_path / "relay.toml"
    path.write_text(
        '[relay]\nworkers = 3\ndata_dir = "/srv/relay"\n[limits]\negress = "10MB"\n'
        '[[limits.schedule]]\nstart = "08:00"\nend = "18:00"\ndays = ["mon"]\negress = "1MB"\n'
        '[agent]\nactions = {scan = "echo hi"}\n'
    )
    config = load_config(path, {}, {"upstream.urls": ["http://a.example/"]})
    again = config_from_dict(config_to_dict(config))
    assert again == config
    assert again.relay.data_dir == Path("/srv/relay")
    assert again.limits.schedule[0].egress == 1_000_000
    assert again.source == str(path)


def test_a_malformed_configuration_from_the_leader_is_a_config_error():
    with pytest.raises(ConfigError, match="limits"):
        config_from_dict({"sections": {"limits": {"egress": "fast"}}})
    with pytest.raises(ConfigError, match="sections"):
        config_from_dict({})


def test_workers_zero_means_one_process_per_core():
    config = load_config(None, {}, {})
    assert config.relay.workers == 0
    assert config.relay.processes == max(1, min(64, len(os.sched_getaffinity(0))))
    assert load_config(None, {"RELAY_RELAY__WORKERS": "1"}, {}).relay.processes == 1
    with pytest.raises(ConfigError, match=r"relay\.workers"):
        load_config(None, {"RELAY_RELAY__WORKERS": "65"}, {})


def test_workers_never_talk_to_systemd():
    env = worker_environment({"NOTIFY_SOCKET": "/run/systemd/notify", "PATH": "/bin"})
    assert env == {"PATH": "/bin"}


async def test_changes_answer_at_once_when_behind_and_hold_otherwise():
    changes = Changes(content=4)
    assert changes.generation == "4.0.0"
    assert await changes.wait("3.0.0", hold=30) == "4.0.0"  # behind: at once
    assert await changes.wait("4.0.0", hold=0.01) == "4.0.0"  # the end of the hold: unchanged
    waiter = asyncio.ensure_future(changes.wait("4.0.0", hold=30))
    await asyncio.sleep(0)
    changes.new_content(5)
    assert await asyncio.wait_for(waiter, 5) == "5.0.0"
    waiter = asyncio.ensure_future(changes.wait("5.0.0", hold=30))
    await asyncio.sleep(0)
    changes.new_settings()
    assert await asyncio.wait_for(waiter, 5) == "5.1.0"
    waiter = asyncio.ensure_future(changes.wait("5.1.0", hold=30))
    await asyncio.sleep(0)
    changes.blob_removed("a" * 64)
    assert await asyncio.wait_for(waiter, 5) == "5.1.1"
    changes.new_content(5)  # the same generation again: nothing to tell
    assert changes.generation == "5.1.1"
    waiter = asyncio.ensure_future(changes.wait("5.1.1", hold=30))
    await asyncio.sleep(0)
    changes.close()
    assert await asyncio.wait_for(waiter, 5) == "5.1.1"
    assert await changes.wait("5.1.1", hold=30) == "5.1.1"  # closed: never held again


def test_removed_blobs_are_told_to_a_worker_behind_or_all_forgotten():
    changes = Changes()
    for i in range(3):
        changes.blob_removed(str(i) * 64)
    assert changes.removed_since(3) == []
    assert changes.removed_since(1) == ["1" * 64, "2" * 64]
    for i in range(GONE_KEPT):
        changes.blob_removed(f"{i:064x}")
    assert changes.removed_since(0) is None  # more than are kept: forget every blob


async def test_stored_metadata_is_the_leaders_generation_verified_again(relay, repo, root_file):
    state = relay_state(relay)
    view = StoredMetadata(root_file.read_bytes(), state.config.relay.metadata_dir)
    assert await view.reload() == state.mirror.current.timestamp_version
    assert view.metadata_file("timestamp.json") == state.mirror.metadata_file("timestamp.json")
    assert view.metadata_file("nonexistent.json") is None
    # Bytes that do not verify are not served: the generation read before stays.
    timestamp = state.config.relay.metadata_dir / "timestamp.json"
    good = timestamp.read_bytes()
    assert b'"expires":"20' in good
    timestamp.write_bytes(good.replace(b'"expires":"20', b'"expires":"21', 1))  # unsigned
    assert await view.reload() == state.mirror.current.timestamp_version
    assert view.metadata_file("timestamp.json") == good


async def test_stored_metadata_before_any_sync_serves_nothing(tmp_path, root_file):
    view = StoredMetadata(root_file.read_bytes(), tmp_path / "metadata")
    (tmp_path / "metadata").mkdir()
    assert await view.reload() is None
    assert view.metadata_file("timestamp.json") is None
    assert view.resolve("app/1.0.0/" + "0" * 64 + ".app.bin") is None


async def _whoami(request: web.Request) -> web.Response:
    return web.json_response({"remote": request.remote, "via_worker": via_worker(request)})


async def test_the_client_address_is_honoured_on_the_unix_socket_only(tmp_path):
    port = free_port()
    app = web.Application(middlewares=[from_workers])
    app.router.add_get("/", _whoami)
    runner = web.AppRunner(app)
    await runner.setup()
    path = tmp_path / "leader.sock"
    await web.UnixSite(runner, str(path)).start()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    headers = {CLIENT_ADDRESS_HEADER: "203.0.113.9"}
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(path))) as s:
            async with s.get("http://leader/", headers=headers) as r:
                assert await r.json() == {"remote": "203.0.113.9", "via_worker": True}
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/", headers=headers) as r:
                assert await r.json() == {"remote": "127.0.0.1", "via_worker": False}
    finally:
        await runner.cleanup()


async def test_internal_routes_are_not_found_over_tcp(relay):
    async with aiohttp.ClientSession() as s:
        for path in ("internal/v1/changes?since=", "internal/v1/settings"):
            async with s.get(relay.url + path) as r:
                assert r.status == 404


async def test_internal_routes_answer_a_workers_own_requests_only(tmp_path):
    app = web.Application(middlewares=[from_workers])
    app[CHANGES] = Changes(content=1)
    app.router.add_get(CHANGES_PATH, changes)
    runner = web.AppRunner(app)
    await runner.setup()
    path = tmp_path / "leader.sock"
    await web.UnixSite(runner, str(path)).start()
    url = f"http://leader{CHANGES_PATH}?since=0.0"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(path))) as s:
            async with s.get(url) as r:
                assert r.status == 200
                answer = await r.json()
                assert answer["generation"] == "1.0.0"
                assert (answer["content"], answer["settings"], answer["removed"]) == (1, 0, 0)
            # A client's request a worker forwards carries its address: not for clients.
            async with s.get(url, headers={CLIENT_ADDRESS_HEADER: "127.0.0.1"}) as r:
                assert r.status == 404
    finally:
        await runner.cleanup()


async def test_an_application_built_outside_relay_serve_serves_alone(serve_relay):
    # The demo and the tests build the application themselves: no workers, whatever the key.
    relay = await serve_relay(**{"relay.workers": 0})
    assert relay_state(relay).config.relay.processes >= 1
    async with aiohttp.ClientSession() as s:
        async with s.get(relay.url + "metrics") as r:
            text = await r.text()
        assert "relay_worker_up{" not in text
        assert not (relay_state(relay).config.relay.data_dir / "run").exists()

"""Under every fault, every client's body is right or visibly failed, and the relay recovers.

A misbehaving origin (:mod:`tests.chaos`) cuts transfers at random offsets, sends a
wrong prefix, ignores Range on the retry, trickles, sends endless metadata, resets
connections and answers 5xx storms; the blob store's writes fail (ENOSPC, EIO); the state
database's disk is full. In each case every client checks the sha256 of what it received:
a complete 200 must be the signed bytes, anything else must be a failed transfer; nothing
wrong is cached; once the fault ends the same request succeeds.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import sqlite3

import aiohttp
import diskcache
import pytest

from relay.cache.mirror import SyncResult
from relay.publisher.repository import Repository
from tests.chaos import ChaosOrigin, FailingWrites, Mode
from tests.support import relay_config, relay_state, start_relay, write_root

SIZE = 2 * 1024 * 1024
BLOB = os.urandom(SIZE)
SHA = hashlib.sha256(BLOB).hexdigest()
CLIENTS = 8


@pytest.fixture
def repo(tmp_path):
    repo = Repository.init(tmp_path / "repo")
    repo.add_bytes(BLOB, "agent.bin", product="agent", version="1.0.0")
    return repo


@pytest.fixture
async def chaos(repo, aiohttp_server):
    origin = ChaosOrigin(repo.public_dir)
    origin.server = await aiohttp_server(origin.app())
    return origin


async def _relay(tmp_path, repo, chaos, aiohttp_server, **overrides):
    values = {
        "sync.prefetch": "none",
        "upstream.retries": 1,
        "upstream.read_timeout": 1,
        "upstream.min_rate": 1024,
        "delta.enabled": False,
        **overrides,
    }
    cfg = relay_config(
        tmp_path,
        [str(chaos.server.make_url("/"))],
        write_root(tmp_path, repo.root_bytes(1)),
        **values,
    )
    relay = await start_relay(aiohttp_server, cfg)
    assert relay_state(relay).mirror.current is not None
    return relay


def _blob_path(repo) -> str:
    return "targets/" + repo.targets()[0].url_path


async def _get(session, url) -> tuple[str, str]:
    """("ok", sha256) for a complete 200, else ("failed", why)."""
    try:
        async with session.get(url) as resp:
            body = await resp.read()
            if resp.status != 200:
                return "failed", f"HTTP {resp.status}"
            if len(body) != SIZE:
                return "failed", f"short: {len(body)}"
            return "ok", hashlib.sha256(body).hexdigest()
    except (TimeoutError, aiohttp.ClientError) as e:
        return "failed", type(e).__name__


async def _clients(relay, path, n=CLIENTS) -> list[tuple[str, str]]:
    url = str(relay.make_url("/" + path))
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        results = await asyncio.gather(*(_get(session, url) for _ in range(n)))
    wrong = [r for r in results if r[0] == "ok" and r[1] != SHA]
    assert not wrong, f"complete bodies with the wrong bytes: {wrong}"
    return results


async def _recovered(relay, path) -> None:
    """Once the fault is over, the blob is served right and stored right."""
    results = await _clients(relay, path, 2)
    assert all(r == ("ok", SHA) for r in results), results
    store = relay_state(relay).mirror.store
    assert store.contains(SHA)
    assert hashlib.sha256(store.path(SHA).read_bytes()).hexdigest() == SHA
    assert not list(store.tmp_dir.iterdir())


async def test_wrong_prefix_then_range_ignored_never_gives_a_wrong_complete_body(
    tmp_path, repo, chaos, aiohttp_server
):
    # The upstream sends wrong bytes and cuts; the relay resumes with Range; the upstream
    # ignores Range and sends the whole file: the fill restarts from zero. Followers that
    # streamed the wrong bytes must fail, never receive a complete-looking body.
    relay = await _relay(tmp_path, repo, chaos, aiohttp_server, **{"upstream.retries": 3})
    path = _blob_path(repo)
    chaos.plan(path, Mode.WRONG_PREFIX, Mode.IGNORE_RANGE)
    results = await _clients(relay, path)
    assert any(r[0] == "failed" for r in results)  # the followers of the wrong prefix
    assert chaos.modes_used[Mode.IGNORE_RANGE] == 1
    await _recovered(relay, path)


async def test_cuts_at_random_offsets_are_resumed_and_every_client_gets_the_bytes(
    tmp_path, repo, chaos, aiohttp_server
):
    relay = await _relay(tmp_path, repo, chaos, aiohttp_server, **{"upstream.retries": 5})
    path = _blob_path(repo)
    chaos.plan(path, Mode.CUT, Mode.CUT, Mode.CUT)
    results = await _clients(relay, path)
    assert results == [("ok", SHA)] * CLIENTS
    assert chaos.hits[path] == 4  # three cuts, three resumes... one fill: 4 requests in all
    await _recovered(relay, path)


@pytest.mark.parametrize(
    "modes",
    [
        (Mode.TRICKLE,) * 8,
        (Mode.RESET, Mode.STORM, Mode.RESET, Mode.STORM),
        (Mode.STORM,) * 4,
    ],
    ids=["trickle", "resets-and-5xx", "5xx-storm"],
)
async def test_a_failing_upstream_fails_the_transfer_visibly_and_recovers(
    tmp_path, repo, chaos, aiohttp_server, modes
):
    relay = await _relay(tmp_path, repo, chaos, aiohttp_server)
    path = _blob_path(repo)
    chaos.plan(path, *modes)
    results = await _clients(relay, path)
    assert all(r[0] == "failed" for r in results), results
    store = relay_state(relay).mirror.store
    assert not store.contains(SHA)
    assert not list(store.tmp_dir.iterdir())
    assert relay_state(relay).mirror.store.fill_in_progress(SHA) is None  # no stuck fill
    chaos.plans.clear()  # the fault ends
    await _recovered(relay, path)


async def test_endless_metadata_fails_the_sync_and_the_relay_keeps_serving(
    tmp_path, repo, chaos, aiohttp_server
):
    relay = await _relay(tmp_path, repo, chaos, aiohttp_server)
    mirror = relay_state(relay).mirror
    path = _blob_path(repo)
    await _recovered(relay, path)
    repo.add_bytes(b"v2" * 1000, "agent.bin", product="agent", version="2.0.0")
    chaos.plan("metadata/timestamp.json", Mode.ENDLESS)
    assert await asyncio.wait_for(mirror.sync_once(), 30) is SyncResult.FAILED
    assert "timestamp" in mirror.last_sync_error or "length" in mirror.last_sync_error.lower()
    await _recovered(relay, path)  # still serving what it verified
    assert await mirror.sync_once() is SyncResult.NEW  # the fault ended


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
async def test_store_write_failures_fail_the_fill_and_keep_nothing(
    tmp_path, repo, chaos, aiohttp_server, error
):
    relay = await _relay(tmp_path, repo, chaos, aiohttp_server)
    store = relay_state(relay).mirror.store
    path = _blob_path(repo)
    failing = FailingWrites(store.root, error)
    with failing.installed():
        failing.on = True
        results = await _clients(relay, path)
        failing.on = False
    assert failing.failed > 0
    assert all(r[0] == "failed" for r in results), results
    assert not store.contains(SHA)
    assert not list(store.tmp_dir.iterdir())
    await _recovered(relay, path)


async def test_a_full_state_database_answers_503_and_changes_nothing(
    tmp_path, repo, chaos, aiohttp_server, monkeypatch
):
    token = tmp_path / "token"
    token.write_text("t0k3n")
    relay = await _relay(tmp_path, repo, chaos, aiohttp_server, **{"admin.token_file": str(token)})
    policy = relay_state(relay).policy
    before = policy.export()
    real_set = diskcache.Cache.set

    def full(*_args, **_kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    base = str(relay.make_url("/")).rstrip("/")
    auth = {"Authorization": "Bearer t0k3n"}
    approval = {"product": "agent", "version": "1.0.0", "status": "approved"}
    checkin = {"agent_id": "pc-1", "installed": []}
    async with aiohttp.ClientSession() as http:
        monkeypatch.setattr(diskcache.Cache, "set", full)
        async with http.post(f"{base}/v1/admin/approvals", json=approval, headers=auth) as r:
            assert r.status == 503 and "Retry-After" in r.headers
        async with http.post(f"{base}/v1/checkin", json=checkin) as r:
            assert r.status == 503 and "Retry-After" in r.headers
        assert policy.export() == before  # nothing took effect
        async with http.get(f"{base}/v1/admin/audit", headers=auth) as r:
            assert not any(e.get("action") == "set-approved" for e in (await r.json())["audit"])
        monkeypatch.setattr(diskcache.Cache, "set", real_set)
        async with http.post(f"{base}/v1/admin/approvals", json=approval, headers=auth) as r:
            assert r.status == 200
        async with http.post(f"{base}/v1/checkin", json=checkin) as r:
            assert r.status == 200
    assert policy.export() != before


async def _keepalive_gets(relay, path, n) -> list[tuple[str, str]]:
    """``n`` requests one after another on one keep-alive connection (while it lives)."""
    url = str(relay.make_url("/" + path))
    connector = aiohttp.TCPConnector(limit=1, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        return [await _get(session, url) for _ in range(n)]


async def test_a_flipped_byte_on_disk_is_never_served_and_the_blob_is_fetched_again(
    tmp_path, repo, chaos, aiohttp_server
):
    relay = await _relay(tmp_path, repo, chaos, aiohttp_server)
    path = _blob_path(repo)
    await _recovered(relay, path)
    stored = relay_state(relay).mirror.store.path(SHA)
    await relay.close()
    # The bytes rot while the relay is down: the next start must not trust them.
    with stored.open("r+b") as f:
        f.seek(SIZE // 3)
        byte = f.read(1)
        f.seek(SIZE // 3)
        f.write(bytes([byte[0] ^ 0x01]))
    hits = chaos.hits[path]
    relay = await _relay(tmp_path, repo, chaos, aiohttp_server)
    assert await _keepalive_gets(relay, path, 3) == [("ok", SHA)] * 3
    assert chaos.hits[path] == hits + 1  # fetched again, once
    store = relay_state(relay).mirror.store
    assert [p.name.split(".")[0] for p in store.quarantine_dir.iterdir()] == [SHA]
    await _recovered(relay, path)


async def test_a_truncated_blob_aborts_the_response_and_the_next_one_is_intact(
    tmp_path, repo, chaos, aiohttp_server
):
    relay = await _relay(tmp_path, repo, chaos, aiohttp_server)
    path = _blob_path(repo)
    await _recovered(relay, path)  # stored, checked, and its file open in the cache
    store = relay_state(relay).mirror.store
    os.truncate(store.path(SHA), SIZE // 2)
    hits = chaos.hits[path]
    first, second, third = await _keepalive_gets(relay, path, 3)
    # The short file cannot give a complete body: the connection is closed rather than
    # left with half a declared body (the next response would land inside it).
    assert first[0] == "failed"
    assert second == ("ok", SHA)
    assert third == ("ok", SHA)
    assert chaos.hits[path] == hits + 1  # quarantined, fetched again once
    await _recovered(relay, path)

"""Blob store rules through a running relay: quota, pins, full store, scrub."""

from __future__ import annotations

import hashlib
import os

import aiohttp

from relay.cache.store import ScrubOutcome
from tests.support import relay_state

SIZE = 100_000


async def _get(relay, target):
    async with (
        aiohttp.ClientSession() as s,
        s.get(relay.make_url(f"/targets/{target.url_path}")) as r,
    ):
        return r.status, await r.read(), r.headers


async def test_quota_evicts_lru_and_never_pinned(repo, serve_relay):
    # Product "app": 4 versions, keep_versions=2 pins the two newest.
    app = [
        repo.add_bytes(os.urandom(SIZE), "app.bin", product="app", version=f"1.0.{i}")
        for i in range(4)
    ]
    other = [
        repo.add_bytes(os.urandom(SIZE), f"tool{i}.bin", product=f"tool{i}", version="1.0.0")
        for i in range(3)
    ]
    relay = await serve_relay(
        **{"sync.prefetch": "none", "store.max_bytes": 5 * SIZE, "store.keep_versions": 2},
    )
    store = relay_state(relay).mirror.store
    for t in app + other:
        status, body, _ = await _get(relay, t)
        assert status == 200 and hashlib.sha256(body).hexdigest() == t.sha256
        assert store.used_bytes <= 5 * SIZE
    # Pinned: the two newest app versions; plus tool0..2 (each the newest of its product).
    pinned = {app[2].sha256, app[3].sha256} | {t.sha256 for t in other}
    assert pinned <= set(store.digests())
    assert store.stats.evictions == 2
    assert "relay_evictions_total 2.0" in relay_state(relay).metrics.render().decode()
    assert not store.contains(app[0].sha256) and not store.contains(app[1].sha256)


async def test_full_store_refuses_new_fills_but_serves_hits(repo, serve_relay):
    a = repo.add_bytes(os.urandom(SIZE), "a.bin", product="a", version="1.0.0")
    b = repo.add_bytes(os.urandom(SIZE), "b.bin", product="b", version="1.0.0")
    relay = await serve_relay(
        **{"sync.prefetch": "none", "store.max_bytes": SIZE + 10, "store.retry_after": 42},
    )
    status, _, _ = await _get(relay, a)
    assert status == 200
    # a is pinned (newest of its product): b cannot fit.
    status, _, headers = await _get(relay, b)
    assert status == 503
    assert headers["Retry-After"] == "42"
    status, body, _ = await _get(relay, a)
    assert status == 200 and hashlib.sha256(body).hexdigest() == a.sha256
    async with aiohttp.ClientSession() as s, s.get(relay.make_url("/metrics")) as r:
        assert 'relay_rejected_total{reason="store_full"}' in await r.text()


async def test_scrub_quarantines_and_refetches(repo, origin, serve_relay):
    t = repo.add_bytes(os.urandom(SIZE), "a.bin", product="a", version="1.0.0")
    relay = await serve_relay()
    state = relay_state(relay)
    store = state.mirror.store
    assert origin.hits[f"targets/{t.url_path}"] == 1
    path = store.path(t.sha256)
    data = bytearray(path.read_bytes())
    data[5] ^= 0xFF
    path.write_bytes(bytes(data))
    counts = await state.mirror.scrub_once()
    assert counts[ScrubOutcome.QUARANTINED] == 1
    assert len(list(store.quarantine_dir.iterdir())) == 1
    assert origin.hits[f"targets/{t.url_path}"] == 2
    assert hashlib.sha256(path.read_bytes()).hexdigest() == t.sha256
    status, body, _ = await _get(relay, t)
    assert hashlib.sha256(body).hexdigest() == t.sha256

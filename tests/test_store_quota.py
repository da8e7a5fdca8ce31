"""A relay under a store quota keeps delivering new versions, version after version.

A signature product gets a new version every "hour" (small changes to a few hundred
KiB); the relay's quota holds ten of them and keeps one by policy. Every new version
must be served right on its first request, patches from the previous version must keep
flowing, and the store must never exceed its quota. (``benchmarks/month_bench.py``
runs the full month: 720 versions of a few MB.)
"""

from __future__ import annotations

import hashlib
import random

import aiohttp

from relay.publisher.repository import Repository
from tests.support import relay_config, relay_state, start_relay, write_root

SIZE = 256 * 1024
VERSIONS = 30
QUOTA_VERSIONS = 10


def _next_content(rng: random.Random, previous: bytes) -> bytes:
    data = bytearray(previous)
    for _ in range(40):  # a signature update: a few small edits
        at = rng.randrange(len(data) - 16)
        data[at : at + 16] = rng.randbytes(16)
    return bytes(data)


async def test_new_versions_always_find_room_and_deltas_keep_flowing(
    tmp_path, serve_origin, aiohttp_server
):
    rng = random.Random(7)
    repo = Repository.init(tmp_path / "repo")
    content = rng.randbytes(SIZE)
    repo.add_bytes(content, "sigs.db", product="sigs", version="1.0.0", kind="content")
    origin = await serve_origin(repo)
    cfg = relay_config(
        tmp_path,
        [origin.url],
        write_root(tmp_path, repo.root_bytes(1)),
        **{
            "store.max_bytes": QUOTA_VERSIONS * SIZE,
            "store.keep_versions": 1,
            "sync.prefetch": "policy",
            "delta.formats": ["zstd"],
            "delta.bases": 1,
        },
    )
    relay = await start_relay(aiohttp_server, cfg)
    state = relay_state(relay)
    store = state.store if hasattr(state, "store") else state.mirror.store
    base = str(relay.make_url("/")).rstrip("/")
    installed = None
    delta_hits = 0
    async with aiohttp.ClientSession() as http:
        for n in range(1, VERSIONS + 1):
            if n > 1:
                content = _next_content(rng, content)
                repo.add_bytes(
                    content, "sigs.db", product="sigs", version=f"1.0.{n - 1}", kind="content"
                )
            await state.mirror.sync_once()
            await state.mirror.prefetch_now()
            current = state.mirror.current
            await state.deltas.compute_all(current)
            assert store.used_bytes <= QUOTA_VERSIONS * SIZE
            # An agent checks in with the previous version and gets the new one.
            body = {"agent_id": "pc-1", "accept_delta": ["zstd"], "installed": []}
            if installed is not None:
                body["installed"] = [installed]
            async with http.post(f"{base}/v1/checkin", json=body) as resp:
                assert resp.status == 200, await resp.text()
                offer = (await resp.json())["offers"][0]
            assert offer["action"] == "install"
            assert offer["sha256"] == hashlib.sha256(content).hexdigest()
            if offer["delta"] is not None:
                async with http.get(offer["delta"]["url"]) as resp:
                    assert resp.status == 200
                    assert resp.headers["Relay-Target-Sha256"] == offer["sha256"]
                    delta_hits += 1
            target_url = (
                f"{base}/targets/{offer['target'].rsplit('/', 1)[0]}/{offer['sha256']}.sigs.db"
            )
            async with http.get(target_url) as resp:
                assert resp.status == 200, f"version {n}: {resp.status} {await resp.text()}"
                assert hashlib.sha256(await resp.read()).hexdigest() == offer["sha256"]
            assert store.used_bytes <= QUOTA_VERSIONS * SIZE
            installed = {"product": "sigs", "version": offer["version"], "sha256": offer["sha256"]}
    assert delta_hits >= VERSIONS - 2  # a patch from the previous version nearly every time
    assert store.stats.full_refusals == 0
    assert store.stats.evictions > 0  # the quota was reached and old versions made room

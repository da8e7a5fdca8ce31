"""Deltas: computed in worker processes, served by the relay, applied and verified."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random

import aiohttp
import pytest
from aiohttp import web

from relay.core.protocol import MEDIA_TYPES, DeltaFormat
from relay.deltas.apply import apply_patch_file
from relay.deltas.engine import DeltaBudget, DeltaEngine, DeltaOutcome
from relay.deltas.formats import apply_patch_bytes, declared_output_size, make_patch
from relay.errors import PatchRejectedError
from relay.publisher.repository import Repository
from tests.support import Origin, relay_config, relay_state, settle, start_relay, write_root


def _release(seed: int, size: int = 1_500_000) -> tuple[bytes, bytes]:
    """A binary and its next release: a few small edits and an insertion."""
    rng = random.Random(seed)
    old = bytearray(rng.randbytes(size))
    new = bytearray(old)
    for _ in range(20):
        at = rng.randrange(size - 100)
        new[at : at + 16] = rng.randbytes(16)
    new[size // 2 : size // 2] = rng.randbytes(2000)
    return bytes(old), bytes(new)


OLD, NEW = _release(1)
NEW_SHA = hashlib.sha256(NEW).hexdigest()


@pytest.mark.parametrize("fmt", list(DeltaFormat))
def test_patch_roundtrip_and_declared_size(fmt):
    patch = make_patch(OLD, NEW, fmt, level=3)
    assert len(patch) < 0.05 * len(NEW)
    assert declared_output_size(patch[:64], fmt) == len(NEW)
    assert (
        apply_patch_bytes(OLD, patch, fmt, expected_length=len(NEW), expected_sha256=NEW_SHA) == NEW
    )


def _wrong_size(patch: bytes, fmt: DeltaFormat) -> bytes:
    if fmt is DeltaFormat.BSDIFF4:
        return patch[:24] + (len(NEW) + 1).to_bytes(8, "little") + patch[32:]
    # zstd: re-make the frame with another pledged size is not possible; declare via a new frame
    return make_patch(OLD, NEW + b"x", fmt, level=3)


@pytest.mark.parametrize("fmt", list(DeltaFormat))
@pytest.mark.parametrize("attack", ["wrong-size", "garbage", "other-pair", "truncated"])
def test_hostile_patches_rejected_and_no_output(tmp_path, fmt, attack):
    good = make_patch(OLD, NEW, fmt, level=3)
    other_old, other_new = _release(2, size=len(NEW) - 2000)
    patch = {
        "wrong-size": _wrong_size(good, fmt),
        "garbage": os.urandom(5000),
        "other-pair": make_patch(other_old, other_new, fmt, level=3)
        if len(other_new) == len(NEW)
        else make_patch(
            other_old, other_new[: len(NEW)] + b"\0" * (len(NEW) - len(other_new)), fmt, level=3
        ),
        "truncated": good[: len(good) // 2],
    }[attack]
    (tmp_path / "old").write_bytes(OLD)
    (tmp_path / "patch").write_bytes(patch)
    with pytest.raises(PatchRejectedError):
        apply_patch_file(
            tmp_path / "old",
            tmp_path / "patch",
            tmp_path / "out",
            fmt=fmt,
            expected_length=len(NEW),
            expected_sha256=NEW_SHA,
        )
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "patch"]


async def _engine_compute(engine, tmp_path, old, new, fmt=DeltaFormat.BSDIFF4, name="p"):
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    return await engine.compute(
        tmp_path / "old",
        tmp_path / "new",
        fmt=fmt,
        new_sha256=hashlib.sha256(new).hexdigest(),
        new_length=len(new),
        dest=tmp_path / name,
    )


async def test_budgets_skip_memory_and_ratio_and_identical(tmp_path):
    small = DeltaEngine(budget=DeltaBudget(max_memory=10 * 1024 * 1024))
    r = await _engine_compute(small, tmp_path, OLD, NEW)
    assert r.outcome is DeltaOutcome.SKIPPED_MEMORY
    assert not (tmp_path / "p").exists()
    engine = DeltaEngine(budget=DeltaBudget(max_ratio=0.5))
    r = await _engine_compute(engine, tmp_path, OLD, os.urandom(len(NEW)), fmt=DeltaFormat.ZSTD)
    assert r.outcome is DeltaOutcome.SKIPPED_RATIO
    assert not (tmp_path / "p").exists()
    r = await engine.compute(
        tmp_path / "old",
        tmp_path / "old",
        fmt=DeltaFormat.ZSTD,
        new_sha256="a" * 64,
        old_sha256="a" * 64,
        new_length=1,
        dest=tmp_path / "q",
    )
    assert r.outcome is DeltaOutcome.IDENTICAL


async def test_diff_killed_for_time_then_next_succeeds_and_loop_stays_responsive(tmp_path):
    big_old, big_new = _release(3, size=8_000_000)
    engine = DeltaEngine(workers=1, budget=DeltaBudget(max_seconds=0.3))
    loop = asyncio.get_running_loop()
    gaps = []

    async def ticker():
        last = loop.time()
        while True:
            await asyncio.sleep(0.01)
            now = loop.time()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    r = await _engine_compute(engine, tmp_path, big_old, big_new, DeltaFormat.BSDIFF4, "slow")
    assert r.outcome is DeltaOutcome.TIMEOUT
    assert not (tmp_path / "slow").exists()
    engine.budget = DeltaBudget(max_seconds=60)
    r = await _engine_compute(engine, tmp_path, OLD, NEW, DeltaFormat.BSDIFF4, "fast")
    tick.cancel()
    assert r.outcome is DeltaOutcome.COMPUTED
    assert (tmp_path / "fast").read_bytes()
    # The loop kept ticking while the diffs ran in child processes.
    assert max(gaps) < 0.5


@pytest.fixture
def repo(tmp_path):
    repo = Repository.init(tmp_path / "repo")
    repo.add_bytes(OLD, "app.bin", product="app", version="1.0.0")
    return repo


async def _get(session, url, **headers):
    async with session.get(url, headers=headers) as r:
        return r.status, r.headers, await r.read()


async def test_relay_computes_serves_and_patches_apply(tmp_path, repo, aiohttp_server):
    origin = Origin(repo.public_dir)
    origin.server = await aiohttp_server(origin.app())
    root = write_root(tmp_path, repo.root_bytes(1))
    relay = await start_relay(
        aiohttp_server, relay_config(tmp_path, [str(origin.server.make_url("/"))], root)
    )
    await settle(relay)
    new_target = repo.add_bytes(NEW, "app.bin", product="app", version="1.1.0")
    old_sha = hashlib.sha256(OLD).hexdigest()
    state = relay_state(relay)
    await state.mirror.sync_once()  # its listener prefetches and computes in the background
    for _ in range(3000):
        if all(state.deltas.lookup(old_sha, NEW_SHA, [f]) for f in DeltaFormat):
            break
        await asyncio.sleep(0.01)
    assert all(state.deltas.lookup(old_sha, NEW_SHA, [f]) for f in DeltaFormat)
    async with aiohttp.ClientSession() as s:
        for fmt in DeltaFormat:
            status, headers, body = await _get(
                s, relay.make_url(f"/deltas/{old_sha}/{NEW_SHA}"), Accept=MEDIA_TYPES[fmt]
            )
            assert status == 200
            assert headers["Relay-Delta-Format"] == fmt
            assert headers["Relay-Target-Sha256"] == NEW_SHA
            assert headers["Relay-Target-Length"] == str(new_target.length)
            assert headers["Content-Type"] == MEDIA_TYPES[fmt]
            assert len(body) < 0.05 * len(NEW)
            assert (
                apply_patch_bytes(OLD, body, fmt, expected_length=len(NEW), expected_sha256=NEW_SHA)
                == NEW
            )
        # Unknown pairs: 404, and the answer does not wait for a computation.
        status, _, _ = await _get(s, relay.make_url(f"/deltas/{'1' * 64}/{NEW_SHA}"))
        assert status == 404
        status, _, _ = await _get(s, relay.make_url(f"/deltas/{NEW_SHA}/{old_sha}"))
        assert status == 404
    text = state.metrics.render().decode()
    assert 'relay_delta_patches_total{format="zstd",outcome="computed"} 1.0' in text
    assert 'relay_delta_full_bytes_replaced_total{format="bsdiff4"}' in text


async def test_relay_to_relay_delta_and_hostile_parent(tmp_path, repo, aiohttp_server):
    origin = Origin(repo.public_dir)
    origin.server = await aiohttp_server(origin.app())
    root = write_root(tmp_path, repo.root_bytes(1))
    parent = await start_relay(
        aiohttp_server,
        relay_config(tmp_path, [str(origin.server.make_url("/"))], root, name="parent"),
    )
    await settle(parent)
    child = await start_relay(
        aiohttp_server,
        relay_config(
            tmp_path, [str(parent.make_url("/"))], root, name="child", **{"sync.prefetch": "none"}
        ),
    )
    await settle(child)
    old_target = repo.targets()[0]
    async with aiohttp.ClientSession() as s:
        status, _, body = await _get(s, child.make_url(f"/targets/{old_target.url_path}"))
        assert status == 200 and body == OLD
    # A release with a 300 kB insertion: the patch spans many network reads.
    big_new = NEW[: len(NEW) // 3] + random.Random(9).randbytes(300_000) + NEW[len(NEW) // 3 :]
    big_sha = hashlib.sha256(big_new).hexdigest()
    new_target = repo.add_bytes(big_new, "app.bin", product="app", version="1.1.0")
    pstate = relay_state(parent)
    await pstate.mirror.sync_once()
    old_sha = hashlib.sha256(OLD).hexdigest()
    for _ in range(3000):
        if all(pstate.deltas.lookup(old_sha, big_sha, [f]) for f in DeltaFormat):
            break
        await asyncio.sleep(0.01)
    cstate = relay_state(child)
    await cstate.mirror.sync_once()
    parent_full_before = sum(
        n for k, n in pstate.metrics.bytes_served.values.items() if k[0] in ("cache", "upstream")
    )
    async with aiohttp.ClientSession() as s:
        status, _, body = await _get(s, child.make_url(f"/targets/{new_target.url_path}"))
    assert status == 200 and body == big_new
    saved = cstate.metrics.delta_wan_saved._value.get()
    assert 0.5 * len(big_new) < saved < len(big_new) - 300_000  # the patch carries the insertion
    parent_full_after = sum(
        n for k, n in pstate.metrics.bytes_served.values.items() if k[0] in ("cache", "upstream")
    )
    assert parent_full_after == parent_full_before  # the full target never crossed the WAN


async def test_hostile_parent_patch_falls_back_to_full_target(tmp_path, repo, aiohttp_server):
    origin = Origin(repo.public_dir)
    new_target = repo.add_bytes(NEW, "app.bin", product="app", version="1.1.0")

    # A parent that serves everything from the origin, except a lying patch.
    async def lying_delta(request):
        patch = make_patch(
            OLD, NEW[:-1] + b"X", DeltaFormat.ZSTD, level=3
        )  # right size, wrong bytes
        return web.Response(
            body=patch,
            headers={
                "Relay-Delta-Format": "zstd",
                "Relay-Target-Sha256": NEW_SHA,
                "Relay-Target-Length": str(len(NEW)),
            },
        )

    app = web.Application()
    app.router.add_get("/deltas/{a}/{b}", lying_delta)
    app.router.add_get("/{tail:.*}", origin._handle)
    parent = await aiohttp_server(app)
    root = write_root(tmp_path, repo.root_bytes(1))
    child = await start_relay(
        aiohttp_server,
        relay_config(
            tmp_path, [str(parent.make_url("/"))], root, name="child", **{"sync.prefetch": "none"}
        ),
    )
    await settle(child)
    async with aiohttp.ClientSession() as s:
        status, _, body = await _get(s, child.make_url(f"/targets/{repo.targets()[0].url_path}"))
        assert body == OLD
        status, _, body = await _get(s, child.make_url(f"/targets/{new_target.url_path}"))
    assert status == 200 and body == NEW
    cstate = relay_state(child)
    assert (
        'relay_delta_rejected_total{reason="parent_patch"} 1.0' in cstate.metrics.render().decode()
    )
    assert origin.hits[f"targets/{new_target.url_path}"] == 1


async def test_relay_answers_requests_while_a_long_diff_runs(tmp_path, repo, aiohttp_server):
    origin = Origin(repo.public_dir)
    origin.server = await aiohttp_server(origin.app())
    root = write_root(tmp_path, repo.root_bytes(1))
    relay = await start_relay(
        aiohttp_server, relay_config(tmp_path, [str(origin.server.make_url("/"))], root)
    )
    await settle(relay)
    state = relay_state(relay)
    big_old, big_new = _release(4, size=8_000_000)
    (tmp_path / "bo").write_bytes(big_old)
    (tmp_path / "bn").write_bytes(big_new)
    diff = asyncio.create_task(
        state.deltas.engine.compute(
            tmp_path / "bo",
            tmp_path / "bn",
            fmt=DeltaFormat.BSDIFF4,
            new_sha256=hashlib.sha256(big_new).hexdigest(),
            new_length=len(big_new),
            dest=tmp_path / "bp",
        )
    )
    answered = 0
    async with aiohttp.ClientSession() as s:
        while not diff.done():
            async with s.get(relay.make_url("/metadata/timestamp.json")) as r:
                assert r.status == 200
                answered += 1
            await asyncio.sleep(0.02)
    assert (await diff).outcome is DeltaOutcome.COMPUTED
    assert answered >= 5  # the diff took seconds; requests kept being answered meanwhile


async def test_parent_patch_goes_through_the_upstream_and_fails_over(
    tmp_path, repo, aiohttp_server
):
    # The child's upstreams: the origin first, then a parent relay.
    origin = Origin(repo.public_dir)
    origin.server = await aiohttp_server(origin.app())
    origin_url = str(origin.server.make_url("/"))
    root = write_root(tmp_path, repo.root_bytes(1))
    parent = await start_relay(
        aiohttp_server, relay_config(tmp_path, [origin_url], root, name="parent")
    )
    await settle(parent)
    parent_url = str(parent.make_url("/"))
    child = await start_relay(
        aiohttp_server,
        relay_config(
            tmp_path,
            [origin_url, parent_url],
            root,
            name="child",
            **{"sync.prefetch": "none", "limits.upstream": 1_000_000_000},
        ),
    )
    await settle(child)
    old_target = repo.targets()[0]
    async with aiohttp.ClientSession() as s:
        status, _, body = await _get(s, child.make_url(f"/targets/{old_target.url_path}"))
        assert status == 200 and body == OLD
    new_target = repo.add_bytes(NEW, "app.bin", product="app", version="1.1.0")
    pstate = relay_state(parent)
    await pstate.mirror.sync_once()
    old_sha = hashlib.sha256(OLD).hexdigest()
    for _ in range(3000):
        if all(pstate.deltas.lookup(old_sha, NEW_SHA, [f]) for f in DeltaFormat):
            break
        await asyncio.sleep(0.01)
    cstate = relay_state(child)
    await cstate.mirror.sync_once()  # from the origin, still up
    patch = pstate.deltas.lookup(old_sha, NEW_SHA, list(DeltaFormat))
    assert patch is not None
    counted = cstate.metrics.upstream_bytes.labels
    before = counted(parent_url)._value.get()
    wan_limit = cstate.mirror.upstream._throttle  # set: limits.upstream is configured
    assert wan_limit is not None
    throttled: list[int] = []

    async def recording_throttle(n):
        throttled.append(n)
        return await wan_limit(n)

    cstate.mirror.upstream._throttle = recording_throttle
    origin_hits = sum(origin.hits.values())
    await origin.server.close()  # the first upstream goes down
    async with aiohttp.ClientSession() as s:
        status, _, body = await _get(s, child.make_url(f"/targets/{new_target.url_path}"))
    assert status == 200 and body == NEW
    # The patch came from the parent, through the child's WAN limiter and byte counter...
    assert sum(throttled) == patch.length
    assert counted(parent_url)._value.get() - before == patch.length
    assert cstate.metrics.delta_wan_saved._value.get() == len(NEW) - patch.length
    # ...after the origin was tried and found down; the full target was fetched from nowhere.
    health = cstate.mirror.upstream.health
    assert health[origin_url].failing_since is not None
    assert health[parent_url].failing_since is None
    assert sum(origin.hits.values()) == origin_hits

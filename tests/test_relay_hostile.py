"""Hostile upstreams are refused; the previous good state keeps serving."""

from __future__ import annotations

import datetime as dt
import hashlib
import os

import aiohttp
import pytest
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from relay.server import make_app
from tests.support import Fault, TufClient, relay_state, released

BLOB_A = os.urandom(200_000)


@pytest.fixture
def repo(repo):
    return released(repo, BLOB_A, "agent.bin", product="agent", version="1.0.0")


def _ts(repo) -> bytes:
    return (repo.public_dir / "metadata" / "timestamp.json").read_bytes()


async def _get(server, path):
    async with aiohttp.ClientSession() as s, s.get(server.make_url(path)) as r:
        return r.status, await r.read()


def _resign(data: bytes, signer, **changes) -> bytes:
    md = Metadata.from_bytes(data)
    for key, value in changes.items():
        setattr(md.signed, key, value)
    md.signatures.clear()
    md.sign(signer)
    return md.to_bytes(JSONSerializer(compact=True))


async def _new_version(repo) -> bytes:
    blob = os.urandom(10_000)
    repo.add_bytes(blob, "agent.bin", product="agent", version="1.0.1")
    return blob


@pytest.mark.parametrize(
    "fault", [Fault(corrupt=True), Fault(extra=b"x" * 100)], ids=["bad-bytes", "extra-bytes"]
)
async def test_bad_target_bytes_are_refused_and_not_cached(repo, origin, serve_relay, fault):
    target = repo.targets()[0]
    origin.faults[f"targets/{target.url_path}"] = fault
    relay = await serve_relay()  # synced, and its prefetch of the target failed
    state = relay_state(relay)
    assert not state.mirror.store.contains(target.sha256)
    # The prefetch failed: asking is 503 with Retry-After, and no new download.
    hits = origin.hits[f"targets/{target.url_path}"]
    for _ in range(5):
        async with aiohttp.ClientSession() as s:
            async with s.get(relay.make_url(f"/targets/{target.url_path}")) as r:
                assert r.status == 503
                assert 0 < int(r.headers["Retry-After"]) <= 60
    assert origin.hits[f"targets/{target.url_path}"] == hits
    assert "relay_fill_backoff_targets 1.0" in state.metrics.render().decode()
    assert state.mirror.clear_backoff() == 1
    # A direct request gets a short read (the connection is aborted), never the bad bytes.
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.get(relay.make_url(f"/targets/{target.url_path}")) as r:
                await r.read()
    assert not state.mirror.store.contains(target.sha256)
    assert list(state.mirror.store.tmp_dir.iterdir()) == []
    # Once the upstream is honest again and the backoff forgotten, the blob is fetched.
    del origin.faults[f"targets/{target.url_path}"]
    state.mirror.clear_backoff()
    status, body = await _get(relay, f"/targets/{target.url_path}")
    assert status == 200
    assert hashlib.sha256(body).hexdigest() == target.sha256


async def test_replayed_old_timestamp_refused_also_after_restart(
    repo, origin, serve_relay, aiohttp_server
):
    old_ts = _ts(repo)
    await _new_version(repo)
    relay = await serve_relay()
    good = relay_state(relay).mirror.current.timestamp_version
    origin.faults["metadata/timestamp.json"] = Fault(body=old_ts)
    assert (await relay_state(relay).mirror.sync_once()).value == "failed"
    assert relay_state(relay).mirror.current.timestamp_version == good
    status, body = await _get(relay, "/metadata/timestamp.json")
    assert status == 200 and body == _ts(repo)
    cfg = relay_state(relay).config
    await relay.close()

    # After a restart, the relay still remembers the newer timestamp.
    relay2 = await aiohttp_server(make_app(cfg))
    state = relay_state(relay2)
    assert state.mirror.current is not None
    assert state.mirror.current.timestamp_version == good
    assert (await state.mirror.sync_once()).value == "failed"
    assert "BadVersionNumberError" in state.mirror.last_sync_error
    status, body = await _get(relay2, "/metadata/timestamp.json")
    assert body == _ts(repo)


async def test_mixed_snapshot_and_targets_versions_refused(repo, origin, serve_relay):
    relay = await serve_relay()
    state = relay_state(relay)
    good = state.mirror.current.timestamp_version
    md = repo.public_dir / "metadata"
    old_targets = sorted(md.glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0]))[-1]
    await _new_version(repo)
    newest = sorted(md.glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0]))[-1]
    origin.faults[f"metadata/{newest.name}"] = Fault(body=old_targets.read_bytes())
    assert (await state.mirror.sync_once()).value == "failed"
    assert state.mirror.current.timestamp_version == good
    assert "targets" in state.mirror.last_sync_error


async def test_metadata_signed_with_wrong_key_refused(repo, origin, serve_relay):
    relay = await serve_relay()
    state = relay_state(relay)
    good_bytes = state.mirror.metadata_file("timestamp.json")
    intruder = CryptoSigner.generate_ed25519()
    md = Metadata.from_bytes(_ts(repo))
    forged = _resign(_ts(repo), intruder, version=md.signed.version + 5)
    origin.faults["metadata/timestamp.json"] = Fault(body=forged)
    assert (await state.mirror.sync_once()).value == "failed"
    assert "timestamp" in state.mirror.last_sync_error
    assert state.mirror.metadata_file("timestamp.json") == good_bytes


async def test_expired_timestamp_refused(repo, origin, serve_relay):
    relay = await serve_relay()
    state = relay_state(relay)
    good_bytes = state.mirror.metadata_file("timestamp.json")
    signer = repo.signer("timestamp")
    md = Metadata.from_bytes(_ts(repo))
    expired = _resign(
        _ts(repo),
        signer,
        version=md.signed.version + 1,
        expires=dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1),
    )
    origin.faults["metadata/timestamp.json"] = Fault(body=expired)
    assert (await state.mirror.sync_once()).value == "failed"
    assert "Expired" in state.mirror.last_sync_error
    assert state.mirror.metadata_file("timestamp.json") == good_bytes
    # Clients of the relay still verify what it serves.
    client = TufClient(
        state.config.relay.data_dir.parent / "client", str(relay.make_url("/")), repo.root_bytes(1)
    )
    got = await client.arefresh_and_download()
    assert got["agent/1.0.0/agent.bin"][0] == BLOB_A


async def test_metrics_count_failures_by_reason(repo, origin, serve_relay):
    relay = await serve_relay()
    origin.faults["metadata/timestamp.json"] = Fault(body=b"{not json")
    await relay_state(relay).mirror.sync_once()
    status, text = await _get(relay, "/metrics")
    assert b'relay_sync_failures_total{reason="MetadataRejectedError:timestamp"}' in text

"""Delegated targets roles are verified, mirrored byte-for-byte and served."""

from __future__ import annotations

import asyncio
import datetime as dt
import os

from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import DelegatedRole, Delegations, Metadata, MetaFile, TargetFile, Targets
from tuf.api.serialization.json import JSONSerializer

from relay.publisher.repository import Repository
from tests.support import TufClient, relay_state

BLOB = os.urandom(50_000)


def _delegate(repo: Repository) -> str:
    """Delegate vendor/* to a role 'vendor' holding one target (python-tuf, by hand)."""
    ser = JSONSerializer(compact=True)
    md_dir = repo.metadata_dir
    ts = Metadata.from_file(str(md_dir / "timestamp.json"))
    snap = Metadata.from_file(str(md_dir / f"{ts.signed.snapshot_meta.version}.snapshot.json"))
    targets = Metadata.from_file(
        str(md_dir / f"{snap.signed.meta['targets.json'].version}.targets.json")
    )
    vendor_key = CryptoSigner.generate_ed25519()
    expires = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=7)
    vendor = Metadata(Targets(version=1, expires=expires))
    path = "vendor/1.0.0/v.bin"
    tf = TargetFile.from_data(path, BLOB, ["sha256"])
    tf.unrecognized_fields["custom"] = {"product": "vendor", "version": "1.0.0", "kind": "content"}
    vendor.signed.targets[path] = tf
    # A path outside the delegation: clients refuse it, so the relay must not offer it.
    outside = TargetFile.from_data("app/9.9.9/a.bin", b"x", ["sha256"])
    outside.unrecognized_fields["custom"] = {"product": "app", "version": "9.9.9"}
    vendor.signed.targets[outside.path] = outside
    (repo.targets_dir / "vendor" / "1.0.0").mkdir(parents=True)
    (repo.targets_dir / "vendor" / "1.0.0" / f"{tf.hashes['sha256']}.v.bin").write_bytes(BLOB)
    vendor.sign(vendor_key)
    (md_dir / "1.vendor.json").write_bytes(vendor.to_bytes(ser))
    role = DelegatedRole(
        name="vendor",
        keyids=[vendor_key.public_key.keyid],
        threshold=1,
        terminating=True,
        paths=["vendor/*/*"],
    )
    targets.signed.delegations = Delegations(
        keys={vendor_key.public_key.keyid: vendor_key.public_key}, roles={"vendor": role}
    )
    targets.signed.version += 1
    targets.signatures.clear()
    targets.sign(repo.signer("targets"))
    (md_dir / f"{targets.signed.version}.targets.json").write_bytes(targets.to_bytes(ser))
    snap.signed.version += 1
    snap.signed.meta["targets.json"] = MetaFile(version=targets.signed.version)
    snap.signed.meta["vendor.json"] = MetaFile(version=1)
    snap.signatures.clear()
    snap.sign(repo.signer("snapshot"))
    (md_dir / f"{snap.signed.version}.snapshot.json").write_bytes(snap.to_bytes(ser))
    ts.signed.version += 1
    ts.signed.snapshot_meta = MetaFile(version=snap.signed.version)
    ts.signatures.clear()
    ts.sign(repo.signer("timestamp"))
    (md_dir / "timestamp.json").write_bytes(ts.to_bytes(ser))
    return path


async def test_delegated_role_through_the_relay(tmp_path, repo, serve_relay):
    repo.add_bytes(os.urandom(1000), "a.bin", product="app", version="1.0.0")
    path = _delegate(repo)
    relay = await serve_relay()
    state = relay_state(relay)
    assert path in state.mirror.current.targets
    assert "app/9.9.9/a.bin" not in state.mirror.current.targets
    assert (
        state.mirror.metadata_file("1.vendor.json")
        == (repo.metadata_dir / "1.vendor.json").read_bytes()
    )
    client = TufClient(tmp_path / "client", str(relay.make_url("/")), repo.root_bytes(1))
    updater = client._updater()
    await asyncio.to_thread(updater.refresh)
    # get_targetinfo fetches delegated metadata: it blocks, so it runs in a thread too.
    assert await asyncio.to_thread(updater.get_targetinfo, "app/9.9.9/a.bin") is None
    info = await asyncio.to_thread(updater.get_targetinfo, path)
    assert info is not None and info.custom["product"] == "vendor"
    dest = tmp_path / "v.bin"
    await asyncio.to_thread(updater.download_target, info, str(dest))
    assert dest.read_bytes() == BLOB

"""``relay export``: a relay's verified data as a static tree for stock TUF clients.

A relay on 127.0.0.1 mirrors a publisher's repository; ``relay export`` writes its data
directory out; a plain aiohttp static server serves the tree; python-tuf's ``Updater``
refreshes and downloads through it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from relay.cache.export import STAGING
from relay.cache.store import FsBlobStore
from relay.cli.main import main
from relay.publisher.repository import Repository
from tests.support import (
    TufClient,
    relay_config,
    settle,
    start_relay,
    write_root,
)

AGENT = os.urandom(300_000)
SIGS = os.urandom(70_000)


@pytest.fixture
def repo(tmp_path):
    repo = Repository.init(tmp_path / "repo")
    repo.add_bytes(AGENT, "agent.bin", product="agent", version="1.0.0")
    repo.add_bytes(SIGS, "sigs.db", product="sigs", version="2024.1.0", kind="content")
    return repo


@pytest.fixture
def root_file(tmp_path, repo):
    return write_root(tmp_path, repo.root_bytes(1), "pinned-root.json")


@pytest.fixture
async def relay(tmp_path, repo, root_file, serve_origin, aiohttp_server):
    origin = await serve_origin(repo)
    config = relay_config(tmp_path, [origin.url], root_file)
    server = await start_relay(aiohttp_server, config)
    await settle(server)
    return server, config


def snapshot_tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its bytes (to check that nothing changed)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


async def export(*argv) -> int:
    """``relay export`` in a thread, as from a shell beside the running relay."""
    return await asyncio.to_thread(main, ["export", *(str(a) for a in argv)])


async def test_stock_client_updates_from_the_static_export(
    tmp_path, repo, root_file, relay, serve_static, capsys
):
    _, config = relay
    out = tmp_path / "www"
    conf = tmp_path / "relay.toml"
    conf.write_text(
        f'[relay]\ndata_dir = "{config.relay.data_dir}"\n'
        f'[upstream]\nurls = ["http://127.0.0.1:9/"]\ntrusted_root = "{root_file}"\n'
    )
    assert await export("--config", conf, out) == 0
    said = capsys.readouterr().out
    assert "2 linked, 0 copied, 0 kept" in said

    # Same filesystem: the exported targets are hard links to the checked store blobs.
    store = FsBlobStore(config.relay.blobs_dir)
    for target in repo.targets():
        exported = out / "targets" / target.url_path
        assert (
            exported.read_bytes()
            == {"agent.bin": AGENT, "sigs.db": SIGS}[target.path.rsplit("/", 1)[1]]
        )
        assert exported.stat().st_ino == store.path(target.sha256).stat().st_ino
    assert not (out / STAGING).exists()
    metadata = {p.name for p in (out / "metadata").iterdir()}
    assert {"1.root.json", "timestamp.json"} <= metadata
    for name in metadata:  # byte-exact: what the publisher signed
        assert (out / "metadata" / name).read_bytes() == (
            repo.public_dir / "metadata" / name
        ).read_bytes()

    url = await serve_static(out)
    client = TufClient(tmp_path / "client", url, repo.root_bytes(1))
    got = await client.arefresh_and_download()
    assert got["agent/1.0.0/agent.bin"][0] == AGENT
    assert got["sigs/2024.1.0/sigs.db"][0] == SIGS


async def test_incremental_run_keeps_unchanged_files_and_adds_the_new_version(
    tmp_path, repo, root_file, relay, serve_static, capsys
):
    server, config = relay
    out = tmp_path / "www"
    data_dir = config.relay.data_dir
    assert await export("--data-dir", data_dir, "--trusted-root", root_file, out) == 0
    url = await serve_static(out)
    client = TufClient(tmp_path / "client", url, repo.root_bytes(1))
    await client.arefresh_and_download()
    before = {p: p.stat() for p in out.rglob("*") if p.is_file()}

    agent2 = os.urandom(200_000)
    repo.add_bytes(agent2, "agent.bin", product="agent", version="1.1.0")
    await settle(server)
    capsys.readouterr()
    assert await export("--data-dir", data_dir, out) == 0  # anchored on the stored root
    said = capsys.readouterr().out
    assert "1 linked, 0 copied, 2 kept" in said
    for path, stat in before.items():
        if path.name != "timestamp.json":  # kept, not rewritten
            assert path.stat().st_ino == stat.st_ino, path
            assert path.stat().st_mtime_ns == stat.st_mtime_ns, path

    got = await client.arefresh_and_download()
    assert got["agent/1.1.0/agent.bin"][0] == agent2
    assert got["agent/1.0.0/agent.bin"][0] == AGENT

    capsys.readouterr()
    assert await export("--data-dir", data_dir, "--check-kept", out) == 0
    assert "0 linked, 0 copied, 3 kept; metadata: 0 written" in capsys.readouterr().out


async def test_damaged_blob_is_refused_and_the_tree_left_as_it_was(
    tmp_path, repo, root_file, relay, capsys
):
    server, config = relay
    out = tmp_path / "www"
    data_dir = config.relay.data_dir
    assert await export("--data-dir", data_dir, "--trusted-root", root_file, out) == 0
    before = snapshot_tree(out)

    new = repo.add_bytes(os.urandom(100_000), "agent.bin", product="agent", version="2.0.0")
    await settle(server)
    blob = FsBlobStore(config.relay.blobs_dir).path(new.sha256)
    damaged = bytearray(blob.read_bytes())
    damaged[5000] ^= 0xFF  # same length, one byte flipped: only a hash finds it
    blob.write_bytes(bytes(damaged))

    capsys.readouterr()
    assert await export("--data-dir", data_dir, "--trusted-root", root_file, out) == 1
    err = capsys.readouterr().err
    assert err.startswith("relay: error: agent/2.0.0/agent.bin: the stored blob")
    assert new.sha256 in err
    assert snapshot_tree(out) == before

    # A first run refused the same way creates nothing, whether it links or copies.
    fresh = tmp_path / "fresh"
    for mode in ((), ("--copy",)):
        assert await export("--data-dir", data_dir, *mode, fresh) == 1
        assert not fresh.exists()


async def test_copy_mode_shares_no_inode_with_the_store(
    tmp_path, repo, relay, serve_static, capsys
):
    _, config = relay
    out = tmp_path / "www"
    assert await export("--data-dir", config.relay.data_dir, "--copy", out) == 0
    assert "0 linked, 2 copied, 0 kept" in capsys.readouterr().out
    store = FsBlobStore(config.relay.blobs_dir)
    for target in repo.targets():
        exported = out / "targets" / target.url_path
        assert exported.stat().st_ino != store.path(target.sha256).stat().st_ino
    client = TufClient(tmp_path / "client", await serve_static(out), repo.root_bytes(1))
    got = await client.arefresh_and_download()
    assert got["agent/1.0.0/agent.bin"][0] == AGENT

    # A damaged file in the tree is kept by a plain run, found by --check-kept.
    exported = out / "targets" / repo.targets()[0].url_path
    exported.write_bytes(b"x" * exported.stat().st_size)
    assert await export("--data-dir", config.relay.data_dir, out) == 0
    capsys.readouterr()
    assert await export("--data-dir", config.relay.data_dir, "--check-kept", out) == 1
    assert f"the exported file {exported} has sha256" in capsys.readouterr().err


async def test_tampered_metadata_is_refused(tmp_path, root_file, relay, capsys):
    _, config = relay
    targets = max(
        config.relay.metadata_dir.glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0])
    )
    targets.write_bytes(targets.read_bytes().replace(b'"agent"', b'"evil!"', 1))
    out = tmp_path / "www"
    assert await export("--data-dir", config.relay.data_dir, "--trusted-root", root_file, out) == 1
    assert "does not verify" in capsys.readouterr().err
    assert not out.exists()


async def test_a_data_dir_without_metadata_is_an_error(tmp_path, capsys):
    assert await export("--data-dir", tmp_path / "empty", tmp_path / "www") == 1
    assert "has the relay synced once?" in capsys.readouterr().err

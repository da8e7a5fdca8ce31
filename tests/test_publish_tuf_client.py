"""A repository made by `relay publish` works with the stock python-tuf client.

The repository's ``public/`` directory is served by a plain static server on
127.0.0.1; the client is ``tuf.ngclient.Updater`` (synchronous, run in a thread).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import Metadata

from relay.cli.main import main
from relay.publisher.repository import Repository
from tests.support import TufClient


def _cli(*argv) -> None:
    assert main([str(a) for a in argv]) == 0, argv


def _add(repo, tmp_path, name, data, *args) -> None:
    f = tmp_path / "upload" / name
    f.parent.mkdir(exist_ok=True)
    f.write_bytes(data)
    _cli("publish", "add", repo, f, *args)


def _root_versions(repo) -> list[int]:
    return sorted(int(p.name.split(".")[0]) for p in (repo / "public/metadata").glob("*.root.json"))


def _client_version(client: TufClient, role: str) -> int:
    return json.loads((client.metadata_dir / f"{role}.json").read_bytes())["signed"]["version"]


async def test_stock_client_downloads_verifies_and_reads_custom_fields(
    tmp_path, serve_static, capsys
):
    repo = tmp_path / "repo"
    _cli(
        "publish",
        "init",
        repo,
        "--root-keys",
        3,
        "--root-threshold",
        2,
        "--expires",
        "timestamp=2d",
    )
    url = await serve_static(repo / "public")
    agent_v1 = os.urandom(20_000)
    sigs = b"sig " * 5000
    eula = b"You agree to be updated.\n"
    _add(repo, tmp_path, "agent.bin", agent_v1, "--product", "agent", "--version", "1.0.0")
    _add(repo, tmp_path, "eula.txt", eula, "--product", "legal", "--version", "1.0.0")
    _add(
        repo,
        tmp_path,
        "sigs.db",
        sigs,
        *("--product", "sigs", "--version", "2024.11.24-rc.1+build.7"),
        *("--kind", "content", "--severity", "critical", "--channel", "beta"),
        *("--eula", "legal/1.0.0/eula.txt", "--action", "scan-now", "--action", "reload"),
    )
    capsys.readouterr()
    _cli("publish", "list", repo)
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == [
        "PATH",
        "VERSION",
        "KIND",
        "SEVERITY",
        "CHANNEL",
        "LENGTH",
        "SHA256",
    ]
    assert "sigs/2024.11.24-rc.1+build.7/sigs.db" in out and "critical" in out and "beta" in out

    root1 = (repo / "public/metadata/1.root.json").read_bytes()
    client = TufClient(tmp_path / "client", url, root1)
    got = await client.arefresh_and_download()
    assert got["agent/1.0.0/agent.bin"] == (
        agent_v1,
        {
            "product": "agent",
            "version": "1.0.0",
            "kind": "software",
            "severity": "normal",
            "channel": "stable",
        },
    )
    assert got["legal/1.0.0/eula.txt"][0] == eula
    assert got["sigs/2024.11.24-rc.1+build.7/sigs.db"] == (
        sigs,
        {
            "product": "sigs",
            "version": "2024.11.24-rc.1+build.7",
            "kind": "content",
            "severity": "critical",
            "channel": "beta",
            "eula": "legal/1.0.0/eula.txt",
            "actions": ["scan-now", "reload"],
        },
    )

    # Key rotations: a client that holds only the first root still updates.
    for role in ("root", "timestamp", "targets", "snapshot"):
        _cli("publish", "rotate", repo, "--role", role)
    agent_v2 = os.urandom(20_000)
    _add(repo, tmp_path, "agent.bin", agent_v2, "--product", "agent", "--version", "1.1.0")
    _cli("publish", "refresh", repo)
    got = await client.arefresh_and_download()
    assert got["agent/1.1.0/agent.bin"][0] == agent_v2
    assert _client_version(client, "root") == 5
    fresh = TufClient(tmp_path / "fresh", url, root1)
    got = await fresh.arefresh_and_download()
    assert set(got) == {
        "agent/1.0.0/agent.bin",
        "agent/1.1.0/agent.bin",
        "legal/1.0.0/eula.txt",
        "sigs/2024.11.24-rc.1+build.7/sigs.db",
    }
    # Every root version stays published, and only under its versioned name.
    assert _root_versions(repo) == [1, 2, 3, 4, 5]
    assert not (repo / "public/metadata/root.json").exists()

    # Removing a target: gone from the metadata and from the served tree.
    _cli("publish", "remove", repo, "agent/1.0.0/agent.bin")
    got = await client.arefresh_and_download()
    assert "agent/1.0.0/agent.bin" not in got
    assert got["agent/1.1.0/agent.bin"][0] == agent_v2
    assert not (repo / "public/targets/agent/1.0.0").exists()


async def test_refresh_gives_clients_a_new_timestamp_and_nothing_else(tmp_path, serve_static):
    repo = tmp_path / "repo"
    _cli("publish", "init", repo, "--expires", "timestamp=6h")
    _add(repo, tmp_path, "a.bin", b"a" * 100, "--product", "a", "--version", "1.0.0")
    url = await serve_static(repo / "public")
    client = TufClient(
        tmp_path / "client", url, (repo / "public/metadata/1.root.json").read_bytes()
    )
    await client.arefresh()
    before = {r: _client_version(client, r) for r in ("timestamp", "snapshot", "targets")}
    _cli("publish", "refresh", repo)
    await client.arefresh()
    after = {r: _client_version(client, r) for r in ("timestamp", "snapshot", "targets")}
    assert after == {**before, "timestamp": before["timestamp"] + 1}


async def test_root_rotation_with_one_old_root_key_offline(tmp_path, serve_static):
    """Threshold 2 of 3: two old keys sign the new root, all three new keys sign it too."""
    repo = Repository.init(tmp_path / "repo", root_keys=3, root_threshold=2)
    repo.add_bytes(b"v1" * 500, "app.bin", product="app", version="1.0.0")
    url = await serve_static(repo.public_dir)
    old_client = TufClient(tmp_path / "old", url, repo.root_bytes(1))
    await old_client.arefresh_and_download()

    offline = tmp_path / "offline"
    offline.mkdir()
    first_key = sorted((repo.keys_dir / "root").glob("*.pem"))[0]
    shutil.move(first_key, offline / first_key.name)
    repo.rotate("root")
    repo.rotate("root")
    repo.add_bytes(b"v2" * 500, "app.bin", product="app", version="2.0.0")

    got = await old_client.arefresh_and_download()
    assert got["app/2.0.0/app.bin"][0] == b"v2" * 500
    assert _client_version(old_client, "root") == 3
    # Root 2 alone, without root 1, is a valid trust anchor (signed by its own keys).
    mid = TufClient(tmp_path / "mid", url, repo.root_bytes(2))
    assert set(await mid.arefresh_and_download()) == {"app/1.0.0/app.bin", "app/2.0.0/app.bin"}

    # Root 2 carries 2 old and 3 new signatures; root 1 trusts it, and so does root 2.
    root1 = Metadata.from_bytes(repo.root_bytes(1))
    root2 = Metadata.from_bytes(repo.root_bytes(2))
    assert len(root2.signatures) == 5
    root1.signed.verify_delegate("root", root2.signed_bytes, root2.signatures)
    root2.signed.verify_delegate("root", root2.signed_bytes, root2.signatures)
    # And not root 3 directly: a client must walk 2 first.
    root3 = Metadata.from_bytes(repo.root_bytes(3))
    with pytest.raises(UnsignedMetadataError):
        root1.signed.verify_delegate("root", root3.signed_bytes, root3.signatures)


async def test_rotation_of_a_lost_timestamp_key(tmp_path, serve_static):
    """The old key is not needed to rotate: the root revokes it."""
    repo = Repository.init(tmp_path / "repo")
    repo.add_bytes(b"x" * 300, "x.bin", product="x", version="1.0.0")
    url = await serve_static(repo.public_dir)
    client = TufClient(tmp_path / "client", url, repo.root_bytes(1))
    await client.arefresh_and_download()
    shutil.rmtree(repo.keys_dir / "timestamp")
    repo = Repository.open(repo.path)
    repo.rotate("timestamp")
    repo.add_bytes(b"y" * 300, "x.bin", product="x", version="1.0.1")
    got = await client.arefresh_and_download()
    assert got["x/1.0.1/x.bin"][0] == b"y" * 300

"""The publisher: a repository made by `relay publish` works with the stock TUF client."""

from __future__ import annotations

import os
import stat

import pytest
from aiohttp import web

from relay.cli import main
from tests.support import TufClient


@pytest.fixture
async def static(aiohttp_server, tmp_path):
    """A plain static HTTP server for REPO/public (what a vendor's web server does)."""
    repo = tmp_path / "repo"
    assert (
        main(
            [
                "publish",
                "init",
                str(repo),
                "--root-keys",
                "3",
                "--root-threshold",
                "2",
                "--expires",
                "timestamp=2d",
            ]
        )
        == 0
    )
    app = web.Application()
    app.router.add_static("/", repo / "public")
    server = await aiohttp_server(app)
    return repo, str(server.make_url("/"))


def _add(repo, tmp_path, name, data, *args):
    f = tmp_path / name
    f.write_bytes(data)
    return main(["publish", "add", str(repo), str(f), *args])


async def test_stock_tuf_client_downloads_and_reads_custom_fields(static, tmp_path, capsys):
    repo, url = static
    agent_v1 = os.urandom(20_000)
    sigs = b"sig " * 5000
    assert (
        _add(repo, tmp_path, "agent.bin", agent_v1, "--product", "agent", "--version", "1.0.0") == 0
    )
    assert (
        _add(
            repo,
            tmp_path,
            "sigs.db",
            sigs,
            "--product",
            "sigs",
            "--version",
            "2024.11.24",
            "--kind",
            "content",
            "--severity",
            "critical",
            "--action",
            "scan-now",
            "--action",
            "reload",
        )
        == 0
    )
    assert main(["publish", "list", str(repo)]) == 0
    out = capsys.readouterr().out
    assert "sigs/2024.11.24/sigs.db" in out and "critical" in out
    root1 = (repo / "public" / "metadata" / "1.root.json").read_bytes()
    client = TufClient(tmp_path / "client", url, root1)
    got = await client.arefresh_and_download()
    assert got["agent/1.0.0/agent.bin"][0] == agent_v1
    assert got["sigs/2024.11.24/sigs.db"] == (
        sigs,
        {
            "product": "sigs",
            "version": "2024.11.24",
            "kind": "content",
            "severity": "critical",
            "channel": "stable",
            "actions": ["scan-now", "reload"],
        },
    )

    # Key rotations: the client that holds only the first root still updates.
    for role in ("root", "timestamp", "targets", "snapshot"):
        assert main(["publish", "rotate", str(repo), "--role", role]) == 0
    agent_v2 = os.urandom(20_000)
    assert (
        _add(repo, tmp_path, "agent.bin", agent_v2, "--product", "agent", "--version", "1.1.0") == 0
    )
    assert main(["publish", "refresh", str(repo)]) == 0
    got = await client.arefresh_and_download()
    assert got["agent/1.1.0/agent.bin"][0] == agent_v2
    fresh = TufClient(tmp_path / "fresh", url, root1)
    got = await fresh.arefresh_and_download()
    assert set(got) == {"agent/1.0.0/agent.bin", "agent/1.1.0/agent.bin", "sigs/2024.11.24/sigs.db"}
    # Every root version stays published.
    versions = sorted(
        int(p.name.split(".")[0]) for p in (repo / "public" / "metadata").glob("*.root.json")
    )
    assert versions == list(range(1, versions[-1] + 1)) and versions[-1] == 5

    # Removing a target: gone from the metadata and from the served tree.
    assert main(["publish", "remove", str(repo), "agent/1.0.0/agent.bin"]) == 0
    got = await client.arefresh_and_download()
    assert "agent/1.0.0/agent.bin" not in got
    assert not list((repo / "public" / "targets" / "agent" / "1.0.0").glob("*"))


def test_keys_are_private_and_outside_public(tmp_path):
    repo = tmp_path / "repo"
    assert main(["publish", "init", str(repo)]) == 0
    keys = repo / "keys"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o700
    for d in keys.rglob("*"):
        mode = stat.S_IMODE(d.stat().st_mode)
        assert mode == (0o700 if d.is_dir() else 0o600), d
    assert list(keys.glob("root/*.pem"))
    for f in (repo / "public").rglob("*"):
        assert b"PRIVATE KEY" not in (f.read_bytes() if f.is_file() else b"")

"""A damaged state database: the relay says so in one line, serves, refuses policy writes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys

import aiohttp
import pytest

from relay.publisher.repository import Repository
from relay.storage.kv import KV, check_state
from tests.support import Origin, free_port, start_relay_process, write_root

TOKEN = "state-test-token"
BLOB = os.urandom(50_000)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def setup(tmp_path, aiohttp_server):
    repo = Repository.init(tmp_path / "repo")
    target = repo.add_bytes(BLOB, "app.bin", product="app", version="1.0.0", kind="content")
    server = await aiohttp_server(Origin(repo.public_dir).app())
    root = write_root(tmp_path, repo.root_bytes(1))
    (tmp_path / "token").write_text(TOKEN)
    data = tmp_path / "data"
    args = ["--upstream", str(server.make_url("/")), "--trusted-root", str(root)]
    args += ["--data-dir", str(data)]
    return args, data, target


async def _start(args, port):
    env = {"RELAY_ADMIN__TOKEN_FILE": os.environ["RELAY_TEST_TOKEN_FILE"]}
    return await start_relay_process(args, port, env=env)


async def _stop(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    return err.decode()


async def _approve(port):
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"http://127.0.0.1:{port}/v1/admin/approvals",
            json={"product": "app", "version": "1.0.0", "status": "declined"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        ) as r,
    ):
        return r.status, await r.json()


async def _cli(*argv):
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay.cli.main",
        "state",
        "check",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode, out.decode() + err.decode()


@pytest.mark.parametrize("damage", ["truncated", "empty"])
async def test_damaged_state_serves_refuses_writes_until_repaired(
    setup, tmp_path, monkeypatch, damage
):
    args, data, target = setup
    monkeypatch.setenv("RELAY_TEST_TOKEN_FILE", str(tmp_path / "token"))
    port = free_port()
    proc = await _start(args, port)
    url = f"http://127.0.0.1:{port}/targets/{target.url_path}"
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        assert r.status == 200  # fetched and stored: the data directory is in use
    assert (await _approve(port))[0] == 200
    await _stop(proc)

    db = data / "state" / "cache.db"
    size = db.stat().st_size
    with db.open("r+b") as f:
        f.truncate(size // 2 if damage == "truncated" else 0)

    port = free_port()
    proc = await _start(args, port)
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{base}/targets/{target.url_path}") as r:
                assert r.status == 200
                assert hashlib.sha256(await r.read()).hexdigest() == target.sha256
            async with s.post(f"{base}/v1/checkin", json={"agent_id": "a1"}) as r:
                assert r.status == 503  # no policy to answer with
        status, body = await _approve(port)
        assert status == 503
        assert "state database" in body["error"] and "relay state check --repair" in body["error"]
        # While the relay runs, --repair refuses (it takes the data directory's lock).
        code, out = await _cli("--data-dir", str(data), "--repair")
        assert code != 0, out
        assert f"PID {proc.pid}" in out, out
        assert not list(data.glob("state.damaged-*"))
    finally:
        log = await _stop(proc)
    lines = [line for line in log.splitlines() if "state database" in line]
    assert len(lines) == 1, log
    assert "Traceback" not in log

    args_dir = ["--data-dir", str(data)]
    code, out = await _cli(*args_dir)
    assert code == 1 and "--repair" in out
    code, out = await _cli(*args_dir, "--repair")
    assert code == 0 and "moved the damaged database" in out
    assert list(data.glob("state.damaged-*"))
    assert (await _cli(*args_dir))[0] == 0

    port = free_port()
    proc = await _start(args, port)
    try:
        assert (await _approve(port))[0] == 200  # an empty policy, writable again
    finally:
        log = await _stop(proc)
    assert "state database" not in log


def test_a_fresh_data_directory_is_not_damage(tmp_path):
    assert check_state(tmp_path / "state", used=False) is None
    assert "missing" in (check_state(tmp_path / "state", used=True) or "")
    KV(tmp_path / "state").close()
    assert check_state(tmp_path / "state", used=True) is None


def test_a_damaged_store_reads_empty_and_refuses_writes(tmp_path):
    kv = KV.open(tmp_path / "state", used=True)
    assert kv.damaged is not None
    assert kv.get_sync("k", "default") == "default"
    assert list(kv.items_sync("")) == []
    assert kv.log_sync() == []
    from relay.errors import StateUnavailableError

    with pytest.raises(StateUnavailableError, match="relay state check --repair"):
        kv.set_sync("k", 1)
    with pytest.raises(StateUnavailableError):
        kv.append_log_sync({"a": 1})
    kv.close()

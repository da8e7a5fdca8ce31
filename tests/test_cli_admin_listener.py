"""``[admin] listen``: the admin API and the status page on their own address only."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import aiohttp

from tests.support import free_port, start_relay_process

TOKEN = "listener-t0ken"


async def _status(session, url, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(url, headers=headers, allow_redirects=False) as r:
        return r.status, await r.text()


async def test_admin_listener_serves_admin_and_ui_and_the_main_one_does_not(
    tmp_path, origin, root_file
):
    port, admin_port = free_port(), free_port()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    args = ["--upstream", origin.url, "--trusted-root", str(root_file)]
    args += ["--data-dir", str(tmp_path / "data"), "--admin-token-file", str(token_file)]
    env = {"RELAY_ADMIN__LISTEN": f"127.0.0.1:{admin_port}"}
    proc = await start_relay_process(args, port, env=env)
    main, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    try:
        async with aiohttp.ClientSession() as s:
            status, text = await _status(s, f"{main}/v1/admin/updates", TOKEN)
            assert status == 404 and "admin.listen" in text
            assert (await _status(s, f"{main}/ui/"))[0] == 404
            assert (await _status(s, f"{main}/ui"))[0] == 404
            assert (await _status(s, f"{main}/readyz"))[0] == 200
            assert (await _status(s, f"{admin}/v1/admin/updates", TOKEN))[0] == 200
            assert (await _status(s, f"{admin}/v1/admin/updates", "wrong"))[0] == 401
            assert (await _status(s, f"{admin}/ui/login"))[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0
    log = err.decode()
    assert f"admin API and /ui/ listening on http://127.0.0.1:{admin_port}/" in log
    assert f"relay listening on http://127.0.0.1:{port}/" in log


async def test_admin_listener_equal_to_the_main_one_is_a_configuration_error(tmp_path, root_file):
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay.cli.main",
        "serve",
        "--upstream",
        "http://127.0.0.1:9/",
        "--trusted-root",
        str(root_file),
        "--data-dir",
        str(tmp_path / "data"),
        "--listen",
        f"127.0.0.1:{port}",
        env={**os.environ, "RELAY_ADMIN__LISTEN": f"127.0.0.1:{port}"},
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 3
    assert "admin.listen" in err.decode() and "RELAY_ADMIN__LISTEN" in err.decode()

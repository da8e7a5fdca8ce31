"""A relay killed with SIGKILL mid-download serves no partial file after restart."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal

import aiohttp
import pytest

from relay.publisher.repository import Repository
from tests.support import Fault, Origin, free_port, start_relay_process, write_root

SIZE = 3 * 1024 * 1024


@pytest.mark.timeout(60)
async def test_sigkill_mid_download_then_restart(tmp_path, aiohttp_server):
    blob = os.urandom(SIZE)
    repo = Repository.init(tmp_path / "repo")
    target = repo.add_bytes(blob, "big.bin", product="big", version="1.0.0")
    origin = Origin(repo.public_dir)
    path = f"targets/{target.url_path}"
    fault = Fault(pause_at=SIZE // 2, paused=asyncio.Event(), resume=asyncio.Event())
    origin.faults[path] = fault
    server = await aiohttp_server(origin.app())
    data_dir = tmp_path / "data"
    root = write_root(tmp_path, repo.root_bytes(1))
    args = [
        "--upstream",
        str(server.make_url("/")),
        "--trusted-root",
        str(root),
        "--data-dir",
        str(data_dir),
    ]
    port = free_port()
    proc = await start_relay_process(args, port)
    url = f"http://127.0.0.1:{port}/{path}"
    async with aiohttp.ClientSession() as s:

        async def download():
            async with s.get(url) as r:
                return await r.read()

        task = asyncio.create_task(download())
        await asyncio.wait_for(fault.paused.wait(), 20)
        tmp_files = list((data_dir / "blobs" / "tmp").iterdir())
        assert len(tmp_files) == 1  # the fill is under way, in a temp file
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        with pytest.raises(aiohttp.ClientError):
            await task
    fault.resume.set()
    assert not (data_dir / "blobs" / "sha256").exists() or not any(
        (data_dir / "blobs" / "sha256").rglob("*[0-9a-f]")
    )

    port = free_port()
    proc = await start_relay_process(args, port)
    try:
        assert list((data_dir / "blobs" / "tmp").iterdir()) == []  # temps deleted at start
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/{path}") as r:
                body = await r.read()
        assert hashlib.sha256(body).hexdigest() == target.sha256
        stored = data_dir / "blobs" / "sha256" / target.sha256[:2] / target.sha256[2:]
        assert stored.read_bytes() == blob
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)

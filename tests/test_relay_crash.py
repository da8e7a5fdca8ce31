"""A relay killed with SIGKILL mid-download serves no partial file after restart."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal

import aiohttp
import pytest

from tests.support import Fault

SIZE = 3 * 1024 * 1024


@pytest.mark.timeout(60)
async def test_sigkill_mid_download_then_restart(repo, origin, relay_process):
    blob = os.urandom(SIZE)
    target = repo.add_bytes(blob, "big.bin", product="big", version="1.0.0")
    path = f"targets/{target.url_path}"
    fault = Fault(pause_at=SIZE // 2, paused=asyncio.Event(), resume=asyncio.Event())
    origin.faults[path] = fault
    relay = await relay_process()
    data_dir = relay.data_dir
    async with aiohttp.ClientSession() as s:

        async def download():
            async with s.get(f"{relay.url}{path}") as r:
                return await r.read()

        task = asyncio.create_task(download())
        await asyncio.wait_for(fault.paused.wait(), 20)
        tmp_files = list((data_dir / "blobs" / "tmp").iterdir())
        assert len(tmp_files) == 1  # the fill is under way, in a temp file
        relay.proc.send_signal(signal.SIGKILL)
        await relay.proc.wait()
        with pytest.raises(aiohttp.ClientError):
            await task
    fault.resume.set()
    assert not (data_dir / "blobs" / "sha256").exists() or not any(
        (data_dir / "blobs" / "sha256").rglob("*[0-9a-f]")
    )

    relay = await relay_process()
    assert list((data_dir / "blobs" / "tmp").iterdir()) == []  # temps deleted at start
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{relay.url}{path}") as r:
            body = await r.read()
    assert hashlib.sha256(body).hexdigest() == target.sha256
    stored = data_dir / "blobs" / "sha256" / target.sha256[:2] / target.sha256[2:]
    assert stored.read_bytes() == blob

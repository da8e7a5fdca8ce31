"""`relay.event_loop`: the asyncio loop `relay serve` runs on (the standard one, or uvloop)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest
import uvloop

from relay.config import load_config
from relay.server.run import loop_factory
from tests.support import free_port, start_relay_process, stop_process

SIZE = 300_007
BIG = 8 * 1024 * 1024 + 5  # more than loopback socket buffers hold: sendfile must wait


def _config(loop: str):
    return load_config(None, {"RELAY_RELAY__EVENT_LOOP": loop}, {})


def test_the_default_loop_is_uvloop_and_asyncio_is_the_standard_one():
    config = load_config(None, {}, {})
    assert config.relay.event_loop == "uvloop"
    assert loop_factory(config.relay.event_loop) is uvloop.new_event_loop
    assert loop_factory("asyncio") is asyncio.new_event_loop


def test_an_unknown_loop_is_refused():
    with pytest.raises(Exception, match="relay.event_loop") as e:
        _config("trio")
    assert "uvloop, asyncio" in str(e.value)


def _loaded(pid: int, library: str) -> bool:
    return library in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.timeout(60)
async def test_a_relay_on_uvloop_serves_blobs_and_metadata_byte_exact(
    tmp_path, repo, origin, root_file
):
    blob = os.urandom(SIZE)
    target = repo.add_bytes(blob, "app.bin", product="app", version="1.0.0")
    big = os.urandom(BIG)
    big_target = repo.add_bytes(big, "big.bin", product="big", version="1.0.0")
    port = free_port()
    args = ["--upstream", origin.url, "--trusted-root", str(root_file)]
    proc = await start_relay_process(
        [*args, "--data-dir", str(tmp_path / "data")],
        port,
        env={"RELAY_RELAY__EVENT_LOOP": "uvloop"},
    )
    try:
        assert _loaded(proc.pid, "uvloop/loop.")
        base = f"http://127.0.0.1:{port}"
        url = f"{base}/targets/{target.url_path}"
        async with aiohttp.ClientSession() as s:
            for _ in range(2):  # from the fill, then from the store (no sendfile on uvloop)
                async with s.get(url) as r:
                    assert r.status == 200
                    assert await r.read() == blob
            async with s.get(url, headers={"Range": "bytes=1000-70999"}) as r:
                assert r.status == 206
                assert await r.read() == blob[1000:71000]
            big_url = f"{base}/targets/{big_target.url_path}"
            async with s.get(big_url) as r:  # the fill
                assert await r.read() == big
            # A slow reader of the stored blob: the socket fills, sendfile waits for room.
            async with s.get(big_url) as r:
                got = bytearray()
                async for chunk in r.content.iter_chunked(256 * 1024):
                    got += chunk
                    if len(got) < 1024 * 1024:
                        await asyncio.sleep(0.05)
                assert bytes(got) == big
            # A client that leaves mid-body: the relay goes on serving the others.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET /targets/{big_target.url_path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await writer.drain()
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            await reader.readexactly(100_000)
            writer.transport.abort()
            async with s.get(big_url, headers={"Range": f"bytes={BIG - 10}-"}) as r:
                assert r.status == 206
                assert await r.read() == big[-10:]
            async with s.get(f"{base}/metadata/timestamp.json") as r:
                assert r.status == 200
                assert await r.read() == (repo.public_dir / "metadata/timestamp.json").read_bytes()
    finally:
        assert await stop_process(proc)  # SIGTERM handled by the loop's signal handler
    assert proc.returncode == 0


def _workers_of(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [
        int(child)
        for child in children
        if b"relay.server.worker" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
async def test_worker_processes_run_on_the_leaders_loop(tmp_path, origin, root_file, loop):
    port = free_port()
    args = ["--upstream", origin.url, "--trusted-root", str(root_file)]
    proc = await start_relay_process(
        [*args, "--data-dir", str(tmp_path / "data")],
        port,
        env={"RELAY_RELAY__WORKERS": "2", "RELAY_RELAY__EVENT_LOOP": loop},
    )
    try:
        workers = _workers_of(proc.pid)
        assert len(workers) == 1
        for pid in (proc.pid, *workers):
            assert _loaded(pid, "uvloop/loop.") is (loop == "uvloop")
    finally:
        assert await stop_process(proc)
    assert proc.returncode == 0

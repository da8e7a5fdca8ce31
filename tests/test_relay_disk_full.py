"""A relay that cannot write (file size limit, as a full disk) refuses the fill, keeps serving hits."""

from __future__ import annotations

import hashlib
import os
import resource
import signal

import aiohttp
import pytest

LIMIT = 1024 * 1024


def _limit_writes():
    # Writes past LIMIT bytes fail with EFBIG instead of killing the process.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


@pytest.mark.timeout(60)
async def test_write_failure_mid_fill(repo, relay_process):
    small = repo.add_bytes(os.urandom(200_000), "small.bin", product="small", version="1.0.0")
    big = repo.add_bytes(os.urandom(3 * LIMIT), "big.bin", product="big", version="1.0.0")
    relay = await relay_process(preexec_fn=_limit_writes)
    base, data_dir = relay.url.rstrip("/"), relay.data_dir
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/targets/{small.url_path}") as r:
            assert hashlib.sha256(await r.read()).hexdigest() == small.sha256
        with pytest.raises(aiohttp.ClientPayloadError):  # a short read, never a full body
            async with s.get(f"{base}/targets/{big.url_path}") as r:
                await r.read()
        # Nothing partial is kept; hits are still served.
        assert list((data_dir / "blobs" / "tmp").iterdir()) == []
        assert not (data_dir / "blobs" / "sha256" / big.sha256[:2] / big.sha256[2:]).exists()
        async with s.get(f"{base}/targets/{small.url_path}") as r:
            assert r.status == 200
            assert hashlib.sha256(await r.read()).hexdigest() == small.sha256
        async with s.get(f"{base}/metrics") as r:
            assert 'relay_fills_total{result="OSError"} 1.0' in await r.text()

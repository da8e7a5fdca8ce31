"""Hostile clients against the metadata fast path and the connection guard of ``relay serve``.

Real processes (one, and a leader with a worker), raw sockets: each test sends exact
bytes and reads exact bytes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from tests.test_fast_metadata import Served, _metadata, serving

pytestmark = pytest.mark.timeout(120)

HEADER_TIMEOUT = 1.0  # seconds (limits.header_timeout)
TS = b"/metadata/timestamp.json"


@contextlib.asynccontextmanager
async def relay(tmp_path, origin, root_file, processes: int, **env: str) -> AsyncIterator[Served]:
    """``relay serve`` synced with ``origin``; ``env``: config keys (``limits__header_timeout``)."""
    values = {"RELAY_LIMITS__HEADER_TIMEOUT": f"{HEADER_TIMEOUT}s"}
    values.update({f"RELAY_{k.upper()}": v for k, v in env.items()})
    async with serving(tmp_path, origin, root_file, processes, values) as served:
        yield served
        assert "Traceback" not in served.log.read_text()


async def exchange(
    port: int, first: bytes, then: list[tuple[float, bytes]], *, quiet: float = 3.0
) -> bytes:
    """Send ``first``, then each ``(delay, bytes)``; everything read until ``quiet`` s of silence.

    ``<EOF>`` ends the answer if the relay closed the connection.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = bytearray()

    async def read() -> None:
        with contextlib.suppress(TimeoutError, OSError):
            while chunk := await asyncio.wait_for(reader.read(65536), quiet):
                out.extend(chunk)
            out.extend(b"<EOF>")

    reading = asyncio.create_task(read())
    with contextlib.suppress(OSError):
        writer.write(first)
        for delay, data in then:
            await asyncio.sleep(delay)
            if reading.done():
                break
            writer.write(data)
            await writer.drain()
    await reading
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return bytes(out)


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "two-processes"])
async def test_an_unread_body_is_not_the_next_head(tmp_path, origin, root_file, repo, processes):
    """A body the handler did not read (a GET's, a POST refused from its length) arrives
    after the answer; aiohttp reads it out: the guard must not take it for a head (then
    ``431``) and close the connection under the client's next request."""
    async with relay(tmp_path, origin, root_file, processes) as served:
        data = _metadata(repo)["timestamp.json"]
        after = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        # The fast path answers a GET with a body before the body has arrived.
        out = await exchange(
            served.port,
            b"GET " + TS + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 98304\r\n\r\n",
            [(0.05, b"x" * 8192)] * 12 + [(0.05, after)],
        )
        assert out.startswith(b"HTTP/1.1 200 OK\r\n"), out[:200]
        assert data in out
        assert b" 431 " not in out, out[-300:]
        assert out.count(b"HTTP/1.1 200 OK\r\n") == 2, out[-300:]  # the next request answered
        assert out.endswith(b'{"status": "ok"}'), out[-300:]
        # A check-in refused from its Content-Length (413), its body sent all the same.
        out = await exchange(
            served.port,
            b"POST /v1/checkin HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 294912\r\n\r\n",
            [(0.02, b"x" * 16384)] * 18 + [(0.05, after)],
        )
        assert out.startswith(b"HTTP/1.1 413 "), out[:200]
        assert b" 431 " not in out, out[-300:]
        assert out.endswith(b'{"status": "ok"}'), out[-300:]


@pytest.mark.parametrize("processes", [1, 2], ids=["one-process", "two-processes"])
async def test_empty_lines_do_not_stop_the_head_timer(tmp_path, origin, root_file, processes):
    """``CRLF CRLF`` before a request line is skipped by the parser; a head that then
    trickles must still be cut at ``limits.header_timeout`` (``408``), as without it."""
    async with relay(tmp_path, origin, root_file, processes) as served:
        trickle = [(0.2, b"X-A: b\r\n")] * 40  # 8 s: far past the head's deadline
        for first in (b"\r\n\r\n", b"\r\n"):
            started = time.monotonic()
            out = await exchange(
                served.port, first, [(0.2, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"), *trickle]
            )
            took = time.monotonic() - started
            assert out.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), (first, out[:200])
            assert took < HEADER_TIMEOUT + 0.2 + 3.0 + 2.0, took  # + first byte + quiet + slack
        # Empty lines, then a whole head in one read: answered.
        out = await exchange(
            served.port, b"\r\n\r\n", [(0.2, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")]
        )
        assert out.startswith(b"HTTP/1.1 200 OK\r\n"), out[:200]
        out = await exchange(served.port, b"\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", [])
        assert out.startswith(b"HTTP/1.1 200 OK\r\n"), out[:200]

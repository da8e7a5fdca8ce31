"""The connection guard in-process: a full relay of busy connections refuses cheaply; EMFILE
while accepting is one log line per ten seconds, not a traceback per attempt."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket

from aiohttp import web

from relay.metrics import RelayMetrics
from relay.server.connections import ConnectionGuard, ConnectionLimits, GuardedSite
from relay.server.state import METRICS


def _app(release: asyncio.Event) -> web.Application:
    app = web.Application()
    app[METRICS] = RelayMetrics()

    async def slow(_request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="done")

    app.router.add_get("/slow", slow)
    return app


async def test_every_connection_busy_then_a_new_one_gets_503_and_nothing_more():
    release = asyncio.Event()
    app = _app(release)
    limits = ConnectionLimits(max_connections=2, retry_after=3)
    guard = ConnectionGuard(app, limits)
    runner = web.AppRunner(app, **limits.handler_args())
    await runner.setup()
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await GuardedSite(runner, sock, guard).start()
    try:
        busy = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            busy.append((reader, writer))
        while len(guard.in_request) < 2:
            await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        answer = await asyncio.wait_for(reader.read(), 5)  # closed by the relay
        writer.close()
        assert answer.startswith(b"HTTP/1.1 503 ")
        assert b"Retry-After: 3\r\n" in answer
        release.set()
        for reader, writer in busy:
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
            writer.close()
        text = app[METRICS].render().decode()
        assert 'relay_connections_closed_total{reason="over_capacity"} 1.0' in text
    finally:
        await runner.cleanup()


async def test_out_of_file_descriptors_is_one_line_per_ten_seconds(caplog):
    app = _app(asyncio.Event())
    ConnectionGuard(app, ConnectionLimits(min_send_rate=0))
    loop = asyncio.get_running_loop()
    before = loop.get_exception_handler()
    app.freeze()
    await app.startup()
    try:
        with caplog.at_level(logging.INFO):
            for _ in range(1000):
                loop.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(errno.EMFILE, "Too many open files"),
                    }
                )
        lines = [r for r in caplog.records if "cannot accept" in r.getMessage()]
        assert len(lines) == 1
        assert lines[0].exc_info is None
        assert "relay_accept_errors_total 1000.0" in app[METRICS].render().decode()
    finally:
        await app.cleanup()
    assert loop.get_exception_handler() is before

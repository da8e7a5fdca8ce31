"""What a worker forwards to its leader comes back as the leader answered, streamed.

A stand-in leader (a real aiohttp application on a Unix socket) answers; a worker-side
application forwards every request to it with :func:`relay.server.forward.forward`.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from relay.metrics import RelayMetrics
from relay.server.forward import Leader, LeaderGoneError, forward
from relay.server.http import CLIENT_ADDRESS_HEADER

BODY = os.urandom(300_000)


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {
            "method": request.method,
            "path": request.raw_path,
            "client": request.headers.get(CLIENT_ADDRESS_HEADER),
            "connection": request.headers.get("Connection"),
            "body": len(body),
            "agent": request.headers.get("Relay-Agent-Id"),
        }
    )


async def _blob(request: web.Request) -> web.StreamResponse:
    if request.headers.get("If-None-Match") == '"x"':
        return web.Response(status=304, headers={"ETag": '"x"'})
    resp = web.StreamResponse(headers={"ETag": '"x"'})
    resp.content_length = len(BODY)
    await resp.prepare(request)
    if request.method == "GET":
        for i in range(0, len(BODY), 50_000):
            await resp.write(BODY[i : i + 50_000])
    return resp


async def _broken(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    resp.content_length = len(BODY)
    await resp.prepare(request)
    await resp.write(BODY[:100_000])
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.abort()  # a fill that failed verification
    return resp


async def _cookies(_request: web.Request) -> web.Response:
    resp = web.Response(text="ok")
    resp.set_cookie("a", "1")
    resp.set_cookie("b", "2")
    return resp


@pytest.fixture
async def through_worker(tmp_path, aiohttp_server):
    """``(worker URL, leader socket path)``: a worker-side server forwarding to a leader."""
    path = tmp_path / "leader.sock"
    leader_app = web.Application()
    leader_app.router.add_route("*", "/echo{tail:.*}", _echo)
    leader_app.router.add_get("/blob", _blob)
    leader_app.router.add_get("/broken", _broken)
    leader_app.router.add_get("/cookies", _cookies)
    runner = web.AppRunner(leader_app)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    leader = Leader(path)
    metrics = RelayMetrics()

    async def handler(request: web.Request) -> web.StreamResponse:
        return await forward(request, leader, metrics)

    worker_app = web.Application()
    worker_app.router.add_route("*", "/{tail:.*}", handler)
    server = await aiohttp_server(worker_app)
    yield str(server.make_url("")), path, runner
    await leader.close()
    await runner.cleanup()


async def test_requests_and_bodies_go_through_with_the_clients_address(through_worker):
    url, _, _ = through_worker
    async with aiohttp.ClientSession() as s:
        headers = {"Relay-Agent-Id": "a1", CLIENT_ADDRESS_HEADER: "203.0.113.9"}
        async with s.post(f"{url}/echo/x%20y?q=1&r=2", data=b"z" * 5000, headers=headers) as r:
            assert r.status == 200
            answer = await r.json()
    assert answer == {
        "method": "POST",
        "path": "/echo/x%20y?q=1&r=2",
        "client": "127.0.0.1",  # the worker's view of the client, not the client's word
        "connection": None,
        "body": 5000,
        "agent": "a1",
    }


async def test_the_leader_routes_the_request_target_the_worker_routed(through_worker):
    # "//x/echo/a" is a path to the worker; joined as a URL it would reach the leader as
    # "/echo/a" (host "x"): a transfer path the worker had not gated nor paced.
    url, _, _ = through_worker
    async with aiohttp.ClientSession() as s:
        async with s.get(URL(f"{url}//x/echo/a")) as r:
            assert r.status == 404  # the leader has no route for "//x/echo/a"
        async with s.get(URL(f"{url}/echo//x?a=1")) as r:
            assert (await r.json())["path"] == "/echo//x?a=1"


async def test_bodies_304_and_head_come_back_as_the_leader_answered(through_worker):
    url, _, _ = through_worker
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{url}/blob") as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == str(len(BODY))
            assert await r.read() == BODY
        async with s.get(f"{url}/blob", headers={"If-None-Match": '"x"'}) as r:
            assert r.status == 304
            assert await r.read() == b""
        async with s.head(f"{url}/blob") as r:
            assert r.status == 200
            assert r.headers["Content-Length"] == str(len(BODY))
        async with s.get(f"{url}/cookies") as r:
            assert sorted(c.key for c in r.cookies.values()) == ["a", "b"]


async def test_a_body_the_leader_aborts_is_a_short_read_for_the_client(through_worker):
    url, _, _ = through_worker
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with s.get(f"{url}/broken") as r:
                await r.read()


async def test_no_leader_is_503_with_retry_after(through_worker):
    url, _, runner = through_worker
    await runner.cleanup()
    async with aiohttp.ClientSession() as s, s.get(f"{url}/echo") as r:
        assert r.status == 503
        assert r.headers["Retry-After"]


async def test_a_leader_that_does_not_answer_is_gone(tmp_path):
    leader = Leader(Path(tmp_path / "nobody.sock"))
    try:
        with pytest.raises(LeaderGoneError):
            await leader.get_json("/internal/v1/settings", timeout=5)
    finally:
        await leader.close()

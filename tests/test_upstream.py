"""Upstream access: documents fetched with failover, throttle, counters and health; errors mapped."""

from __future__ import annotations

import json

import aiohttp
import pytest
from aiohttp import web

from relay.cache.upstream import AiohttpFetcher, Upstream, map_exceptions
from relay.errors import (
    LengthMismatchError,
    StoreError,
    TransportError,
    UpstreamHTTPError,
    UpstreamUnavailableError,
)

PATCH = bytes(range(256)) * 300  # several network reads


class Recorder:
    """What the upstream's throttle and byte counters were told."""

    def __init__(self) -> None:
        self.throttled: list[int] = []
        self.counted: dict[str, int] = {}

    async def throttle(self, n: int) -> None:
        self.throttled.append(n)

    def count(self, base: str, n: int) -> None:
        self.counted[base] = self.counted.get(base, 0) + n


@pytest.fixture
async def session():
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


def parent_app(seen: list[dict[str, str]]) -> web.Application:
    async def delta(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.Response(body=PATCH, headers={"Relay-Delta-Format": "zstd"})

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]))

    async def policy(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer secret":
            raise web.HTTPUnauthorized
        return web.json_response({"approvals": []})

    app = web.Application()
    app.router.add_get("/deltas/a/b", delta)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/metadata/{code}.json", status)
    app.router.add_get("/v1/admin/policy", policy)
    return app


async def down_url(aiohttp_server) -> str:
    """The URL of a server that was running and is now gone (connections refused)."""
    server = await aiohttp_server(web.Application())
    url = str(server.make_url("/"))
    await server.close()
    return url


async def test_fetch_bytes_fails_over_throttles_counts_and_records_health(aiohttp_server, session):
    seen: list[dict[str, str]] = []
    dead = await down_url(aiohttp_server)
    live = str((await aiohttp_server(parent_app(seen))).make_url("/"))
    recorder = Recorder()
    upstream = Upstream(
        AiohttpFetcher(session), [dead, live], retries=1, backoff=0.01, throttle=recorder.throttle
    )
    upstream.on_bytes(recorder.count)
    body, headers = await upstream.fetch_bytes(
        "deltas/a/b", max_length=len(PATCH), headers={"Accept": "application/vnd.relay.zstd-patch"}
    )
    assert body == PATCH
    assert headers["relay-delta-format"] == "zstd"  # the transport's case-insensitive headers
    assert sum(recorder.throttled) == len(PATCH)
    assert len(recorder.throttled) > 1
    assert recorder.counted == {live: len(PATCH)}
    assert upstream.bytes_received == len(PATCH)
    assert upstream.health[dead].failing_since is not None
    assert upstream.health[dead].failures == 2  # the first try and one retry
    assert upstream.health[live].failing_since is None
    assert upstream.health[live].last_ok is not None
    assert len(seen) == 1
    assert seen[0]["Accept"] == "application/vnd.relay.zstd-patch"
    assert seen[0]["Accept-Encoding"] == "identity"
    # The failing upstream is now tried last: the next fetch goes straight to the live one.
    await upstream.fetch_bytes("deltas/a/b", max_length=len(PATCH))
    assert upstream.health[dead].failures == 2


async def test_fetch_bytes_not_found_too_long_and_refused(aiohttp_server, session):
    live = str((await aiohttp_server(parent_app([]))).make_url("/"))
    upstream = Upstream(AiohttpFetcher(session), [live], retries=1, backoff=0.01)
    with pytest.raises(UpstreamHTTPError) as missing:
        await upstream.fetch_bytes("status/404", max_length=10)
    assert missing.value.status_code == 404
    assert upstream.health[live].failing_since is None  # it answered: it is up
    with pytest.raises(UpstreamUnavailableError) as too_long:
        await upstream.fetch_bytes("deltas/a/b", max_length=len(PATCH) - 1)
    assert [type(c) for c in too_long.value.causes] == [LengthMismatchError]  # not retried
    # Unlike metadata (an object store's 403 is a missing key), 403 here is a refusal.
    with pytest.raises(UpstreamUnavailableError) as refused:
        await upstream.fetch_bytes("status/403", max_length=10)
    assert [c.status_code for c in refused.value.causes] == [403]
    with pytest.raises(UpstreamHTTPError) as metadata:
        await upstream.get_metadata("403.json", 10)
    assert metadata.value.status_code == 404
    with pytest.raises(UpstreamUnavailableError) as busy:
        await upstream.fetch_bytes("status/503", max_length=10)
    assert [c.status_code for c in busy.value.causes] == [503, 503]  # retried


async def test_with_base_url_shares_transport_and_counters_not_health(aiohttp_server, session):
    origin = str((await aiohttp_server(parent_app([]))).make_url("/"))
    parent = await aiohttp_server(parent_app([]))
    recorder = Recorder()
    upstream = Upstream(AiohttpFetcher(session), [origin], retries=0, throttle=recorder.throttle)
    upstream.on_bytes(recorder.count)
    admin = upstream.with_base_url(str(parent.make_url("")).rstrip("/"))
    parent_base = str(parent.make_url("/"))
    assert admin.base_urls == [parent_base]
    body, headers = await admin.fetch_bytes(
        "v1/admin/policy", max_length=1024, headers={"Authorization": "Bearer secret"}
    )
    assert json.loads(body) == {"approvals": []}
    assert headers["Content-Type"].startswith("application/json")
    assert recorder.counted == {parent_base: len(body)}
    assert sum(recorder.throttled) == len(body)
    assert upstream.bytes_received == admin.bytes_received == len(body)
    assert list(upstream.health) == [origin]
    with pytest.raises(UpstreamUnavailableError) as refused:
        await admin.fetch_bytes("v1/admin/policy", max_length=1024)
    assert [c.status_code for c in refused.value.causes] == [401]
    assert admin.health[parent_base].failing_since is not None
    assert upstream.health[origin].failing_since is None


def test_map_exceptions_translates_transport_errors_only():
    with pytest.raises(TransportError, match="http://x/: ClientPayloadError") as e:
        with map_exceptions("http://x/"):
            raise aiohttp.ClientPayloadError("broken body")
    assert isinstance(e.value.__cause__, aiohttp.ClientPayloadError)
    for raised in (TimeoutError(), ConnectionResetError(), ValueError("bad header")):
        with pytest.raises(TransportError), map_exceptions("http://x/"):
            raise raised
    mismatch = LengthMismatchError("http://x/", 1, 2)
    with pytest.raises(LengthMismatchError) as kept, map_exceptions("http://x/"):
        raise mismatch
    assert kept.value is mismatch
    with pytest.raises(StoreError), map_exceptions("http://x/"):
        raise StoreError("not the network's")

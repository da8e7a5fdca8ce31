"""An HTTP cache in front of a relay: nginx ``proxy_cache``, stock TUF clients behind it.

The relay marks content-addressed URLs (targets, versioned metadata) immutable and gives
``timestamp.json`` a short ``max-age``; nginx honours those headers (its
``proxy_cache_valid`` applies only to responses that carry none). So a second client's
blob is a cache HIT, while ``timestamp.json`` goes back to the relay once its max-age
is over: a new version reaches clients behind the cache within that bound.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path

import aiohttp
import pytest

from relay.publisher.repository import Repository
from tests.support import (
    TufClient,
    free_port,
    relay_config,
    settle,
    start_relay,
    write_root,
)

AGENT = os.urandom(250_000)
MAX_AGE_WAIT = 30.0  # bound on waiting for timestamp.json's max-age (10 s) to run out


def nginx_conf(directory: Path, port: int, relay_url: str) -> str:
    # nginx's workers drop to "nobody" when started as root; the temp dirs are private.
    user = "user root;" if os.geteuid() == 0 else ""
    return f"""
{user}
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format cache '$request_method $uri $status $upstream_cache_status';
    access_log {directory}/access.log cache;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    proxy_cache_path {directory}/cache levels=1:2 keys_zone=relay:1m max_size=100m
                     inactive=1h use_temp_path=off;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass {relay_url};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache relay;
            proxy_cache_key $uri;
            # Only for responses without Cache-Control/Expires: the relay's own
            # headers (immutable, or max-age=10 for timestamp.json) take precedence.
            proxy_cache_valid 200 206 1m;
            proxy_cache_revalidate on;
            proxy_cache_lock on;
            add_header X-Cache-Status $upstream_cache_status always;
        }}
    }}
}}
"""


@pytest.fixture
def repo(tmp_path):
    repo = Repository.init(tmp_path / "repo")
    repo.add_bytes(AGENT, "agent.bin", product="agent", version="1.0.0")
    return repo


@pytest.fixture
async def relay(tmp_path, repo, serve_origin, aiohttp_server):
    origin = await serve_origin(repo)
    root = write_root(tmp_path, repo.root_bytes(1), "pinned-root.json")
    server = await start_relay(aiohttp_server, relay_config(tmp_path, [origin.url], root))
    await settle(server)
    return server


@pytest.fixture
async def cdn(tmp_path, relay):
    """nginx with ``proxy_cache`` in front of the relay; yields (base URL, access log)."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    directory = tmp_path / "nginx"
    directory.mkdir()
    port = free_port()
    (directory / "nginx.conf").write_text(
        nginx_conf(directory, port, str(relay.make_url("/")).rstrip("/"))
    )
    proc = await asyncio.create_subprocess_exec(
        nginx,
        "-p",
        str(directory),
        "-c",
        "nginx.conf",
        "-g",
        "daemon off;",
        stderr=asyncio.subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(200):
                try:
                    async with s.get(f"{base}/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if proc.returncode is not None:
                    err = await proc.stderr.read()
                    pytest.fail(f"nginx exited: {err.decode()}")
                await asyncio.sleep(0.05)
        yield base, directory / "access.log"
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGQUIT)
            await proc.wait()


def cache_log(log: Path, uri_end: str) -> list[str]:
    """``$upstream_cache_status`` of each logged GET whose path ends in ``uri_end``."""
    out = []
    for line in log.read_text().splitlines():
        method, uri, _status, cache = [*line.split(), "-"][:4]
        if method == "GET" and uri.endswith(uri_end):
            out.append(cache)
    return out


async def logged(log: Path, uri_end: str, n: int) -> list[str]:
    """:func:`cache_log` once it has ``n`` lines: nginx writes a line as the request ends,
    which may be just after the client has read the last byte (bounded wait)."""
    for _ in range(100):
        lines = cache_log(log, uri_end)
        if len(lines) >= n:
            return lines
        await asyncio.sleep(0.05)
    return cache_log(log, uri_end)


async def get(base: str, path: str) -> tuple[bytes, str, str]:
    async with aiohttp.ClientSession() as s, s.get(f"{base}{path}") as r:
        assert r.status == 200, (path, r.status)
        return await r.read(), r.headers["X-Cache-Status"], r.headers["Cache-Control"]


async def wait_until_not_hit(base: str, path: str) -> tuple[bytes, str]:
    """GET ``path`` until the cache goes back to the relay (its max-age is over)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MAX_AGE_WAIT
    while loop.time() < deadline:
        body, status, _ = await get(base, path)
        if status != "HIT":
            return body, status
        await asyncio.sleep(0.5)
    pytest.fail(f"{path} still a HIT after {MAX_AGE_WAIT} s: max-age not honoured")


async def test_stock_clients_through_an_http_cache(tmp_path, repo, relay, cdn):
    base, log = cdn
    target = repo.targets()[0]
    blob = f"/targets/{target.url_path}"

    first = TufClient(tmp_path / "client-1", base, repo.root_bytes(1))
    got = await first.arefresh_and_download()
    assert got["agent/1.0.0/agent.bin"][0] == AGENT
    assert await logged(log, blob, 1) == ["MISS"]

    second = TufClient(tmp_path / "client-2", base, repo.root_bytes(1))
    got = await second.arefresh_and_download()
    assert got["agent/1.0.0/agent.bin"][0] == AGENT
    # The second client's blob came from the cache, not from the relay.
    assert await logged(log, blob, 2) == ["MISS", "HIT"]
    body, status, cache_control = await get(base, blob)
    assert (body, status) == (AGENT, "HIT")
    assert "immutable" in cache_control

    # timestamp.json: cached for its short max-age, then revalidated with the relay
    # (its ETag unchanged: a 304, the cached copy is served again).
    _, _, cache_control = await get(base, "/metadata/timestamp.json")
    assert cache_control == "public, max-age=10"
    _, status = await wait_until_not_hit(base, "/metadata/timestamp.json")
    assert status == "REVALIDATED"

    # A new version: the relay syncs it; behind the cache it shows once max-age is over.
    agent2 = os.urandom(120_000)
    repo.add_bytes(agent2, "agent.bin", product="agent", version="1.1.0")
    await settle(relay)
    new_timestamp = (repo.public_dir / "metadata" / "timestamp.json").read_bytes()
    body, status = await wait_until_not_hit(base, "/metadata/timestamp.json")
    assert (body, status) == (new_timestamp, "EXPIRED")
    got = await second.arefresh_and_download()
    assert got["agent/1.1.0/agent.bin"][0] == agent2
    assert got["agent/1.0.0/agent.bin"][0] == AGENT

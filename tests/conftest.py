"""Shared fixtures: a publisher's repository and real servers on 127.0.0.1, no mocked sessions.

The chain most tests need is built from small fixtures, each overridable in a test
module (a module's own ``repo`` fixture may request this one and add its releases):

* ``repo``: an empty publisher :class:`Repository` in ``tmp_path/repo``;
* ``origin``: a fault-injecting :class:`Origin` serving ``repo``'s ``public/`` tree;
* ``root_file``: the repository's first root, written where a relay or agent pins it;
* ``serve_relay``: starts in-process relays (aiohttp test servers) against ``origin``;
* ``relay``: one such relay with the default test configuration;
* ``relay_process``: starts ``relay serve`` as a real process against ``origin``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from relay.publisher.repository import Repository
from tests.support import (
    Origin,
    RelayProcess,
    free_port,
    relay_config,
    settle,
    start_relay,
    start_relay_process,
    stop_process,
    write_root,
)


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    """Relays started by a test serve from one process (``relay.workers = 1``), as before
    the key existed, unless the test is about worker processes and says otherwise."""
    monkeypatch.setenv("RELAY_RELAY__WORKERS", "1")


@pytest.fixture
def serve_origin(aiohttp_server):
    """Start a fault-injecting origin for a publisher's repository on loopback."""

    async def go(repo) -> Origin:
        origin = Origin(repo.public_dir)
        origin.server = await aiohttp_server(origin.app())
        origin.url = str(origin.server.make_url("/"))
        return origin

    return go


@pytest.fixture
def serve_static(aiohttp_server):
    """Serve a directory as a plain static web server would (aiohttp ``add_static``).

    ``await serve_static(directory)`` returns the base URL, ending in ``/``. No fault
    injection and no knowledge of TUF: what a vendor's nginx in front of
    ``REPO/public`` does.
    """

    async def go(directory) -> str:
        app = web.Application()
        app.router.add_static("/", directory)
        server = await aiohttp_server(app)
        return str(server.make_url("/"))

    return go


@pytest.fixture
def repo(tmp_path) -> Repository:
    """An empty publisher repository in ``tmp_path/repo`` (keys, root 1, no targets)."""
    return Repository.init(tmp_path / "repo")


@pytest.fixture
async def origin(repo, serve_origin) -> Origin:
    """The origin serving ``repo``'s ``public/`` tree; it reads files per request, so
    releases added to ``repo`` later are served too."""
    return await serve_origin(repo)


@pytest.fixture
def root_file(tmp_path, repo) -> Path:
    """``repo``'s first root, written to ``tmp_path/root.json`` (what a relay pins)."""
    return write_root(tmp_path, repo.root_bytes(1))


@pytest.fixture
def serve_relay(tmp_path, aiohttp_server, origin, root_file) -> Callable[..., Awaitable[Any]]:
    """Start in-process relays on loopback, each synced and prefetched before it is returned.

    ``await serve_relay(upstreams=None, *, name="relay", trusted_root=None, **overrides)``
    builds :func:`tests.support.relay_config` (upstreams default to ``[origin.url]``, the
    trusted root to ``root_file``, data in ``tmp_path/name``; dotted config keys go in
    ``overrides``) and returns the aiohttp test server, with ``url`` (its base URL, ending
    in ``/``) set.
    """

    async def go(
        upstreams: list[str] | None = None,
        *,
        name: str = "relay",
        trusted_root: Path | None = None,
        **overrides: Any,
    ) -> Any:
        config = relay_config(
            tmp_path,
            upstreams if upstreams is not None else [origin.url],
            trusted_root if trusted_root is not None else root_file,
            name=name,
            **overrides,
        )
        relay = await start_relay(aiohttp_server, config)
        await settle(relay)
        relay.url = str(relay.make_url("/"))
        return relay

    return go


@pytest.fixture
async def relay(serve_relay) -> Any:
    """One relay with the default test configuration, in front of ``origin``."""
    return await serve_relay()


@pytest.fixture
async def relay_process(tmp_path, origin, root_file) -> AsyncIterator[Callable[..., Any]]:
    """Start ``relay serve`` as a real process in front of ``origin`` (prefetch off).

    ``await relay_process(preexec_fn=None)`` returns a :class:`tests.support.RelayProcess`
    once ``/readyz`` answers 200. Every start uses the same data directory,
    ``tmp_path/data``, so a second start is a restart. Processes still running at the
    end of the test get SIGTERM (a clean exit, so their coverage data is written) and
    must exit within 20 s.
    """
    started: list[asyncio.subprocess.Process] = []
    data_dir = tmp_path / "data"

    async def go(*, preexec_fn: Callable[[], None] | None = None) -> RelayProcess:
        args = ["--upstream", origin.url, "--trusted-root", str(root_file)]
        port = free_port()
        proc = await start_relay_process(
            [*args, "--data-dir", str(data_dir)], port, preexec_fn=preexec_fn
        )
        started.append(proc)
        return RelayProcess(proc, f"http://127.0.0.1:{port}/", data_dir)

    yield go
    for proc in started:
        if not await stop_process(proc):
            raise TimeoutError(f"relay process {proc.pid} ignored SIGTERM for 20 s")

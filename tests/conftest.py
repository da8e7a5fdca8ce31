"""Shared fixtures: real servers on 127.0.0.1, no mocked sessions."""

from __future__ import annotations

import pytest
from aiohttp import web

from tests.support import Origin


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

"""Shared fixtures: real servers on 127.0.0.1, no mocked sessions."""

from __future__ import annotations

import pytest

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

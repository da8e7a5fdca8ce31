"""The relay's HTTP server (aiohttp)."""

from relay.server.app import make_app

__all__ = ["make_app"]

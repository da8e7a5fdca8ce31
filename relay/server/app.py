"""The relay's aiohttp application: its components (:mod:`relay.server.compose`) and routes."""

from __future__ import annotations

from aiohttp import web

from relay.config import Config
from relay.metrics import RelayMetrics
from relay.server.compose import components
from relay.server.events import answer_held
from relay.server.internal import close_changes
from relay.server.routes import add_routes
from relay.server.state import CONFIG, METRICS


def make_app(
    config: Config, *, metrics: RelayMetrics | None = None, processes: int = 1
) -> web.Application:
    """Build the relay application for ``config``.

    ``processes``: the processes serving it, this one (the leader) and its workers; only
    ``relay serve`` starts workers (:mod:`relay.server.run`), so an application built
    anywhere else serves alone, whatever ``relay.workers`` says.

    Raises:
        ConfigError: at start-up (in the cleanup context) for a missing trusted
            root or upstream.
    """
    app = web.Application(client_max_size=1024 * 1024)
    app[CONFIG] = config
    app[METRICS] = metrics or RelayMetrics()
    app.cleanup_ctx.append(components)
    app.on_shutdown.append(answer_held)
    app.on_shutdown.append(close_changes)
    add_routes(app, processes=processes)
    return app

"""Every route of the relay, in one table."""

from __future__ import annotations

from aiohttp import web

from relay.server import admin, agents, blobs, events, metadata, ops, ui
from relay.server.http import COUNTS, counted
from relay.server.internal import add_internal_routes
from relay.server.metadata import METADATA_HEADERS, MetadataHeaders
from relay.server.state import METRICS


async def _not_found(_request: web.Request) -> web.StreamResponse:
    raise web.HTTPNotFound(text="not found\n")


def add_routes(app: web.Application, *, processes: int = 1) -> None:
    """Register every route of the relay on ``app`` (``processes``: its own and its workers')."""
    app[METADATA_HEADERS] = MetadataHeaders()
    app[COUNTS] = app[METRICS].requests.values
    for path, handler, name in (
        ("/metadata/{name}", metadata.metadata, "metadata"),
        ("/targets/{tail:.+}", blobs.target, "targets"),
        ("/deltas/{src}/{dst}", blobs.delta, "deltas"),
        ("/healthz", ops.healthz, "healthz"),
        ("/readyz", ops.readyz, "readyz"),
        ("/metrics", ops.metrics_handler, "metrics"),
        ("/v1/events", events.events, "events"),
    ):
        app.router.add_get(path, counted(name, handler), name=name)
    app.router.add_post("/v1/checkin", counted("checkin", agents.checkin), name="checkin")
    app.router.add_post("/v1/reports", counted("reports", agents.reports), name="reports")
    admin.add_admin_routes(app)
    ui.add_ui_routes(app)
    add_internal_routes(app, processes)
    app.router.add_get("/{tail:.*}", counted("other", _not_found), name="other")

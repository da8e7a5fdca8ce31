"""Running a relay: listening socket, access log, logging format, signals.

Rules:

* One access log line per request, in text or JSON; off entirely with
  ``relay.access_log = false`` (it is a measurable share of the per-request cost).
* JSON logs put one object per line, so a log shipper needs no parser.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest

from relay.config import Config
from relay.errors import ConfigError
from relay.server.app import make_app

logger = logging.getLogger(__name__)


class JsonFormatter(logging.Formatter):
    """Formats a log record as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as a JSON line."""
        out: dict[str, Any] = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            out.update(extra)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


def setup_logging(log_format: str, level: int) -> None:
    """Configure the root logger for ``text`` or ``json`` output."""
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path, status, bytes, seconds, agent."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Write the access line (aiohttp passes the request's duration as ``time``)."""
        fields = {
            "remote": request.remote,
            "method": request.method,
            "path": request.path_qs,
            "status": response.status,
            "bytes": response.body_length,
            "seconds": round(time, 6),
            "agent": request.headers.get("Relay-Agent-Id", ""),
        }
        self.logger.info(
            '%s "%s %s" %s %s %.6f %s',
            fields["remote"],
            fields["method"],
            fields["path"],
            fields["status"],
            fields["bytes"],
            time,
            fields["agent"],
            extra={"fields": fields},
        )


def split_listen(config: Config) -> tuple[str, int]:
    """Return (host, port) of ``relay.listen``.

    Raises:
        ConfigError: the value is not ``HOST:PORT``.
    """
    listen = config.relay.listen
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(
            "relay.listen", listen, config.source_of("relay.listen"), "expected HOST:PORT"
        )
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - an empty host means all


async def serve(config: Config, *, ready: asyncio.Event | None = None) -> None:
    """Run a relay until cancelled."""
    # File opens, reads and fsyncs hop to threads; each hop is short, but many run at
    # once under load, and the default pool (cores + 4) would queue them.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=32, thread_name_prefix="relay-io")
    )
    app = make_app(config)
    runner = web.AppRunner(
        app,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("relay.access") if config.relay.access_log else None,
        handle_signals=True,
    )
    await runner.setup()
    host, port = split_listen(config)
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
        logger.warning("relay listening on http://%s:%d/", host, port)
        if ready is not None:
            ready.set()
        started = time.monotonic()
        while True:
            await asyncio.sleep(3600)
            logger.debug("up %.0f s", time.monotonic() - started)
    finally:
        await runner.cleanup()

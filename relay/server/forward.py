"""A worker process's line to its leader: requests forwarded over the leader's socket.

Rules:

* A forwarded request goes to the leader as the client sent it (method, path and
  query, headers but the hop-by-hop ones, body streamed as it arrives), with the
  client's address in :data:`relay.server.http.CLIENT_ADDRESS_HEADER`; the answer
  comes back streamed the same way: bytes are written to the client as they arrive
  (a cold blob the leader is still fetching included), never buffered whole.
* A body that breaks mid-way (the leader aborted it: a fill that failed
  verification) aborts the client's connection: a short read, never a
  complete-looking body.
* A leader that cannot be reached before the answer starts is ``503`` with
  ``Retry-After``; a ``GET`` or ``HEAD`` whose pooled connection the leader had just
  closed is sent once more on a new one.
* Transfers (``pace`` given) are paced here, by the worker's limiter: the leader
  neither gates nor paces what a worker forwards.
* An answer the leader ends with ``Connection: close`` (a body that came too late)
  ends the client's connection too.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from relay.metrics import RelayMetrics
from relay.server.blobs import BODY_BYTES
from relay.server.http import CLIENT_ADDRESS_HEADER, unavailable
from relay.transfer.bandwidth import Pacer

logger = logging.getLogger(__name__)

LEADER_RETRY_AFTER = 2  # seconds: a leader restarting is back soon
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        CLIENT_ADDRESS_HEADER.lower(),
    }
)
_NOT_COPIED_BACK = frozenset({*_HOP_BY_HOP, "content-length", "date", "server"})
_HOST = "leader"
_BASE = URL(f"http://{_HOST}")


class LeaderGoneError(Exception):
    """The leader did not answer (its socket refused or closed the connection)."""


class Leader:
    """The HTTP client of the leader's private socket.

    Args:
        socket_path: ``<data_dir>/run/leader.sock``.
        idle_timeout: seconds a pooled connection is kept idle: below the leader's
            own keep-alive timeout, so the leader never closes one as it is reused.
    """

    def __init__(self, socket_path: Path, idle_timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(
                path=str(socket_path), limit=0, keepalive_timeout=idle_timeout
            ),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )

    async def get_json(
        self, path: str, query: dict[str, str] | None = None, *, timeout: float
    ) -> dict[str, Any]:
        """``GET path?query`` on the leader (a long poll too) and decode its JSON object.

        Raises:
            LeaderGoneError: no answer, or not a 200 with a JSON object.
        """
        try:
            async with self.session.get(
                _BASE.with_path(path).with_query(query),
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                if resp.status != 200:
                    raise LeaderGoneError(f"{path}: HTTP {resp.status}")
                data = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            raise LeaderGoneError(f"{path}: {type(e).__name__}: {e}") from e
        if not isinstance(data, dict):
            raise LeaderGoneError(f"{path}: not a JSON object")
        return data

    async def close(self) -> None:
        """Close the pooled connections."""
        await self.session.close()


async def forward(
    request: web.Request, leader: Leader, metrics: RelayMetrics, pace: Pacer | None = None
) -> web.StreamResponse:
    """Answer ``request`` with the leader's answer, streamed both ways.

    Args:
        request: the client's request.
        leader: the leader's client.
        metrics: the worker's metrics (a refusal is counted).
        pace: the client's pacer when this is a paced transfer.
    """
    headers = CIMultiDict(
        (k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP
    )
    headers[CLIENT_ADDRESS_HEADER] = request.remote or ""
    # The request target as the client sent it: the leader must route the path this
    # process routed. (Joined as a URL, "//host/targets/..." would lose "//host" and
    # reach the leader as a transfer this process neither gated nor paced.)
    path, _, query = request.raw_path.partition("?")
    url = URL.build(scheme="http", host=_HOST, path=path, query_string=query, encoded=True)
    retry = request.method in ("GET", "HEAD") and not request.body_exists
    try:
        answer = await _send(request, leader, url, headers, retry=retry)
    except LeaderGoneError as e:
        logger.warning("%s %s: the leader did not answer: %s", request.method, request.path, e)
        return unavailable("leader_unavailable", LEADER_RETRY_AFTER, metrics)
    async with answer:
        resp = web.StreamResponse(status=answer.status, reason=answer.reason)
        for key, value in answer.headers.items():
            if key.lower() not in _NOT_COPIED_BACK:
                resp.headers.add(key, value)
        if answer.content_length is not None:
            resp.content_length = answer.content_length
        if "close" in answer.headers.get("Connection", "").lower():
            resp.force_close()  # the leader closes after this answer (a body too late): so here
        await resp.prepare(request)
        if request.method != "HEAD":
            await _copy_body(request, answer, resp, pace)
        await resp.write_eof()
        return resp


async def _send(
    request: web.Request,
    leader: Leader,
    url: URL,
    headers: CIMultiDict[str],
    *,
    retry: bool,
) -> aiohttp.ClientResponse:
    body = request.content.iter_any() if request.body_exists else None
    for attempt in (1, 2):
        try:
            return await leader.session.request(
                request.method,
                url,
                headers=headers,
                data=body,
                allow_redirects=False,
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
            )
        except aiohttp.ServerDisconnectedError as e:
            # A pooled connection the leader closed as it was taken: once more, anew.
            if not retry or attempt == 2:
                raise LeaderGoneError(str(e)) from e
        except (aiohttp.ClientError, OSError) as e:
            raise LeaderGoneError(f"{type(e).__name__}: {e}") from e
    raise AssertionError("unreachable")  # pragma: no cover


async def _copy_body(
    request: web.Request,
    answer: aiohttp.ClientResponse,
    resp: web.StreamResponse,
    pace: Pacer | None,
) -> None:
    sent = resp[BODY_BYTES] = 0
    content = answer.content
    try:
        while True:
            if pace is not None:
                data = await content.read(pace.chunk())
                if data:
                    await pace.wait(len(data))
            else:
                data = await content.readany()
            if not data:
                break
            await resp.write(data)
            sent += len(data)
            resp[BODY_BYTES] = sent
    except (aiohttp.ClientError, asyncio.IncompleteReadError) as e:
        # The leader aborted the body (a fill that failed): the client sees a short read.
        transport = request.transport
        if transport is not None:
            transport.abort()
        logger.warning(
            "aborted %s after %d bytes: the leader's answer broke: %s", request.path, sent, e
        )
        raise web.HTTPBadGateway from None

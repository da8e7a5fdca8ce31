"""Agent identity over HTTP: tokens from check-ins, per-agent limits on the proven id only,
reports only from agents that checked in; the reference agent waits out 503 Retry-After."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
import urllib3
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from relay.agent.updater import RelayFetcher
from relay.core.tokens import issue_token
from relay.server.http import agent_key
from relay.server.state import AGENT_SECRET
from tests.support import relay_state


async def _post(relay, path, body, headers=None):
    async with (
        aiohttp.ClientSession() as s,
        s.post(relay.make_url(path), json=body, headers=headers or {}) as r,
    ):
        return r.status, await r.json()


def _request(relay, headers):
    """A request as the relay's handlers see it, with ``headers``."""
    return make_mocked_request("GET", "/", headers=headers, app=relay.app)


async def test_checkin_answers_a_token_that_proves_only_its_id(relay):
    status, body = await _post(relay, "/v1/checkin", {"agent_id": "host-1"})
    assert status == 200
    token = body["agent_token"]
    proven = _request(relay, {"Relay-Agent-Id": "host-1", "Relay-Agent-Token": token})
    assert agent_key(proven) == "agent:host-1"
    for headers in (
        {"Relay-Agent-Id": "host-2", "Relay-Agent-Token": token},  # another id
        {"Relay-Agent-Id": "host-1", "Relay-Agent-Token": _forged(token)},
        {"Relay-Agent-Id": "host-1"},  # no token
        {
            "Relay-Agent-Id": "host-1",  # expired
            "Relay-Agent-Token": issue_token(
                relay.app[AGENT_SECRET], "host-1", time.time() - 30 * 86400
            ),
        },
    ):
        assert agent_key(_request(relay, headers)).startswith("addr:"), headers


@pytest.mark.parametrize(
    "token",
    ["1.\u00b2\u00b3.abc", "1.0.x", "1..", "\u00e9." * 40, "1.99999999999999999999.A"],
)
async def test_a_malformed_token_counts_as_no_token_on_every_route(relay, token):
    headers = {"Relay-Agent-Id": "host-1", "Relay-Agent-Token": token}
    status, body = await _post(relay, "/v1/checkin", {"agent_id": "host-1"}, headers)
    assert status == 200, body
    status, _ = await _post(relay, "/v1/reports", {"agent_id": "host-1", "events": []}, headers)
    assert status == 202  # from the address of its check-in
    async with aiohttp.ClientSession() as s:
        for path in ("/v1/events?since=x", "/targets/none"):
            async with s.get(relay.make_url(path), headers=headers) as r:
                assert r.status < 500, (path, r.status)


async def test_a_token_for_another_id_cannot_check_in(relay):
    _, body = await _post(relay, "/v1/checkin", {"agent_id": "host-1"})
    headers = {"Relay-Agent-Id": "host-1", "Relay-Agent-Token": body["agent_token"]}
    status, err = await _post(relay, "/v1/checkin", {"agent_id": "host-9"}, headers)
    assert status == 403 and "host-1" in err["error"]


async def test_reports_only_from_agents_that_checked_in(relay):
    event = {"product": "app", "event": "failed", "reason": "install_failed"}
    status, _ = await _post(relay, "/v1/reports", {"agent_id": "ghost", "events": [event]})
    assert status == 403
    assert relay_state(relay).registry.get("ghost") is None
    await _post(relay, "/v1/checkin", {"agent_id": "host-1"})
    status, _ = await _post(relay, "/v1/reports", {"agent_id": "host-1", "events": [event]})
    assert status == 202  # no token, but from the address of its check-in


async def test_report_reasons_outside_the_set_count_as_other(relay):
    await _post(relay, "/v1/checkin", {"agent_id": "host-1"})
    events = [
        {"product": "app", "event": "failed", "reason": r}
        for r in ("install_failed", "made-up", "another made-up")
    ]
    status, _ = await _post(relay, "/v1/reports", {"agent_id": "host-1", "events": events})
    assert status == 202
    text = relay_state(relay).metrics.render().decode()
    assert 'relay_agent_events_total{event="failed",reason="install_failed"} 1.0' in text
    assert 'relay_agent_events_total{event="failed",reason="other"} 2.0' in text
    history = relay_state(relay).registry.get("host-1").to_dict()
    assert "made-up" in str(history)  # the text stays in the agent's history


@pytest.fixture
async def busy_server(aiohttp_server):
    """Answers 503 with Retry-After: 1 to the first two requests, then 200."""
    seen = []

    async def handle(request: web.Request) -> web.Response:
        seen.append((time.monotonic(), request.headers.get("Relay-Agent-Token")))
        if len(seen) <= 2:
            return web.Response(status=503, headers={"Retry-After": "1"}, text="busy")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/x", handle)
    server = await aiohttp_server(app)
    server.seen = seen
    return server


async def test_the_agent_waits_out_retry_after_within_its_budget(busy_server):
    fetcher = RelayFetcher("host-1", urllib3.PoolManager(), 5, busy_wait=10)
    fetcher.set_token("tok")
    resp = await asyncio.to_thread(fetcher.request, "GET", str(busy_server.make_url("/x")))
    assert resp.status == 200 and resp.read() == b"ok"
    times = [t for t, _ in busy_server.seen]
    assert len(times) == 3
    assert all(b - a >= 1 for a, b in zip(times, times[1:], strict=False))  # waited as told
    assert {token for _, token in busy_server.seen} == {"tok"}


async def test_past_its_budget_the_agent_gets_the_503(busy_server):
    fetcher = RelayFetcher("host-1", urllib3.PoolManager(), 5, busy_wait=0.5)
    resp = await asyncio.to_thread(fetcher.request, "GET", str(busy_server.make_url("/x")))
    assert resp.status == 503
    assert len(busy_server.seen) == 1


def _forged(token: str) -> str:
    """``token`` with its last character changed (never to the same one)."""
    return token[:-1] + ("y" if token.endswith("x") else "x")

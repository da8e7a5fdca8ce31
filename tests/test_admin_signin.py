"""Admin sign-ins: failures counted, logged and slowed down per address; syncs audited."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from relay.server.signin import SignInGuard
from tests.support import relay_state
from tests.test_approvals import TOKEN, admin, relay, repo  # noqa: F401 - fixtures

__all__ = ["relay", "repo"]


async def _audit_actions(state, n):
    for _ in range(200):
        entries = await state.policy.audit_log()
        if len(entries) >= n:
            return [e["action"] for e in entries]
        await asyncio.sleep(0.02)
    raise AssertionError(await state.policy.audit_log())


async def test_five_wrong_tokens_then_429_even_with_the_right_one(relay):
    for _ in range(5):
        status, _ = await admin(relay, "GET", "/v1/admin/settings", token="guess")
        assert status == 401
    async with aiohttp.ClientSession() as s:
        async with s.get(
            relay.make_url("/v1/admin/settings"), headers={"Authorization": f"Bearer {TOKEN}"}
        ) as r:
            assert r.status == 429
            assert 1 <= int(r.headers["Retry-After"]) <= 60
    text = relay_state(relay).metrics.render().decode()
    assert 'relay_admin_signin_failures_total{outcome="refused"} 5.0' in text
    assert 'relay_admin_signin_failures_total{outcome="rate_limited"} 1.0' in text
    assert await _audit_actions(relay_state(relay), 5) == ["refused-sign-in"] * 5


async def test_a_sync_is_audited(relay):
    status, body = await admin(relay, "POST", "/v1/admin/sync")
    assert status == 200
    entries = await relay_state(relay).policy.audit_log()
    assert entries[-1]["action"] == "sync"
    assert entries[-1]["result"] == body["result"]
    assert entries[-1]["from"] == "127.0.0.1"


def test_the_window_slides_and_addresses_are_bounded():
    guard = SignInGuard(max_failures=2, window=10, audit_per_window=3, max_addresses=2)
    assert guard.blocked_for("a", 0) == 0
    guard.failed("a", 0)
    guard.failed("a", 4)
    assert guard.blocked_for("a", 5) == pytest.approx(5)  # until the first leaves the window
    assert guard.blocked_for("a", 10.5) == 0
    assert guard.blocked_for("b", 5) == 0  # per address
    guard.failed("b", 11)
    guard.failed("c", 11)
    guard.failed("d", 11)  # a is forgotten: at most two addresses
    assert guard.blocked_for("a", 11) == 0
    assert [guard.may_audit(t) for t in (0, 1, 2, 3, 11)] == [True, True, True, False, True]

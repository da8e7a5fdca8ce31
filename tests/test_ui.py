"""The status page over HTTP: sign-in, cookie flags, CSRF, escaping, sessions, and off
without an admin token (the browser tests drive the same pages in Chromium)."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest

from relay.server.ui import SESSION_COOKIE, Sessions
from tests.fleet_support import TOKEN, populate, start_fleet
from tests.support import relay_state


@pytest.fixture
async def fleet(tmp_path, aiohttp_server):
    fleet = await start_fleet(tmp_path, aiohttp_server)
    await populate(fleet)
    return fleet


def client():
    return aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))


async def sign_in(s, fleet, token=TOKEN):
    async with s.post(
        fleet.relay.make_url("/ui/login"), data={"token": token}, allow_redirects=False
    ) as r:
        return r.status, r.headers, await r.text()


async def page(s, fleet, path="/ui/"):
    async with s.get(fleet.relay.make_url(path), allow_redirects=False) as r:
        return r.status, r.headers, await r.text()


def csrf_of(html):
    return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


async def test_nothing_without_signing_in(fleet):
    async with client() as s:
        for path in ("/ui/", "/ui/report.csv", "/ui/agents/broken"):
            status, headers, _ = await page(s, fleet, path)
            assert status == 303 and headers["Location"] == "/ui/login"
        status, _, body = await page(s, fleet, "/ui/login")
        assert status == 200 and 'type="password"' in body and "broken" not in body
        async with s.post(fleet.relay.make_url("/ui/approvals"), data={"csrf": "x"}) as r:
            assert r.status == 403


async def test_sign_in_sets_a_strict_http_only_session_cookie(fleet):
    async with client() as s:
        status, _, body = await sign_in(s, fleet, "wrong")
        assert status == 401 and "Wrong token." in body
        status, headers, _ = await sign_in(s, fleet)
        assert status == 303 and headers["Location"] == "/ui/"
        cookie = headers["Set-Cookie"]
        assert cookie.startswith(f"{SESSION_COOKIE}=")
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui/" in cookie
        assert TOKEN not in cookie
        status, headers, body = await page(s, fleet)
        assert status == 200 and "install_failed" in body
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert headers["Cache-Control"] == "no-store"
        assert "<script" not in body and "http://" not in body.split("<main>")[0]


async def test_changes_need_the_sessions_csrf_token(fleet):
    async with client() as s, client() as other:
        await sign_in(s, fleet)
        await sign_in(other, fleet)
        _, _, body = await page(s, fleet)
        mine = csrf_of(body)
        _, _, body = await page(other, fleet)
        theirs = csrf_of(body)
        assert mine != theirs
        before = relay_state(fleet.relay).policy.state
        form = {"product": "app", "version": "1.0.0", "group": "", "status": "declined"}
        for data in (form, {**form, "csrf": theirs}, {**form, "csrf": ""}):
            async with s.post(fleet.relay.make_url("/ui/approvals"), data=data) as r:
                assert r.status == 403
        assert relay_state(fleet.relay).policy.state == before
        async with s.post(
            fleet.relay.make_url("/ui/approvals"),
            data={**form, "csrf": mine},
            allow_redirects=False,
        ) as r:
            assert r.status == 303
        assert relay_state(fleet.relay).policy.state != before
        # Unknown words and unknown updates are refused, not a 500.
        for data, code in (
            ({**form, "csrf": mine, "status": "maybe"}, 400),
            ({**form, "csrf": mine, "version": "9.9.9"}, 404),
        ):
            async with s.post(fleet.relay.make_url("/ui/approvals"), data=data) as r:
                assert r.status == code
        # Sign-out needs the token too, and ends the session.
        async with s.post(fleet.relay.make_url("/ui/logout"), data={}) as r:
            assert r.status == 403
        async with s.post(
            fleet.relay.make_url("/ui/logout"), data={"csrf": mine}, allow_redirects=False
        ) as r:
            assert r.status == 303 and r.headers["Location"] == "/ui/login"
        status, _, _ = await page(s, fleet)
        assert status == 303
        status, _, _ = await page(other, fleet)
        assert status == 200


async def test_everything_is_escaped(fleet):
    body = {
        "agent_id": "x",
        "events": [
            {
                "product": "<b>p</b>",
                "event": "failed",
                "reason": "<script>alert(1)</script>",
                "message": '"><img src=x onerror=alert(2)>',
            },
        ],
    }
    async with aiohttp.ClientSession() as s:
        # Reports come only from agents that checked in.
        async with s.post(fleet.relay.make_url("/v1/checkin"), json={"agent_id": "x"}) as r:
            assert r.status == 200
        async with s.post(fleet.relay.make_url("/v1/reports"), json=body) as r:
            assert r.status == 202
    async with client() as s:
        await sign_in(s, fleet)
        for path in ("/ui/", "/ui/agents/x"):
            _, _, html = await page(s, fleet, path)
            assert (
                "<script>alert" not in html and "<img src=x" not in html and "<b>p</b>" not in html
            )
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        status, _, html = await page(s, fleet, "/ui/agents/nobody")
        assert status == 404
        status, _, html = await page(s, fleet, "/ui/?state=<x>")
        assert status == 400 and "<x>" not in html
        status, headers, text = await page(s, fleet, "/ui/report.csv?group=lab")
        assert status == 200 and headers["Content-Type"].startswith("text/csv")
        assert {line.split(",")[0] for line in text.splitlines()[1:]} == {"lazy", "new"}


async def test_off_without_an_admin_token(tmp_path, aiohttp_server):
    fleet = await start_fleet(tmp_path, aiohttp_server, **{"admin.token": ""})
    async with client() as s:
        for path in ("/ui/", "/ui/login"):
            status, _, _ = await page(s, fleet, path)
            assert status == 404
        status, _, _ = await sign_in(s, fleet, "")
        assert status == 404


def test_sessions_expire_and_stay_bounded():
    now = [1000.0]
    sessions = Sessions(ttl=60, limit=3, clock=lambda: now[0])
    sid, session = sessions.open()
    assert (
        sessions.get(sid) is session
        and sessions.get("other") is None
        and sessions.get(None) is None
    )
    now[0] += 61
    assert sessions.get(sid) is None and len(sessions) == 0
    ids = [sessions.open()[0] for _ in range(4)]
    assert len(sessions) == 3 and sessions.get(ids[0]) is None and sessions.get(ids[-1]) is not None
    sessions.close(ids[-1])
    assert sessions.get(ids[-1]) is None


async def test_a_sign_in_form_that_never_ends_gets_408(tmp_path, aiohttp_server):
    fleet = await start_fleet(tmp_path, aiohttp_server, **{"limits.body_timeout": "0.5s"})
    url = fleet.relay.make_url("/ui/login")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(
        b"POST /ui/login HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\ntoken="
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.read(1024), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 408") and b"Connection: close" in head
    async with client() as s:  # the relay goes on: a whole form signs in
        status, headers, _ = await sign_in(s, fleet)
        assert status == 303 and headers["Location"] == "/ui/"

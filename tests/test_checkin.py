"""Check-in and report bodies: 400 naming the field, 413 before reading a huge body."""

from __future__ import annotations

import hashlib
import json

import aiohttp
import pytest

from tests.support import relay_state, released

V1 = b"v1" * 1000
SHA = hashlib.sha256(V1).hexdigest()


@pytest.fixture
def repo(repo):
    return released(repo, V1, "a.bin", product="app", version="1.0.0", kind="content")


async def post(relay, path, data, **headers):
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            relay.make_url(path), data=data, headers={"Content-Type": "application/json", **headers}
        ) as r,
    ):
        return r.status, await r.json()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "body"),
        (b"[]", "body"),
        (json.dumps({}).encode(), "agent_id"),
        (json.dumps({"agent_id": "bad id!"}).encode(), "agent_id"),
        (json.dumps({"agent_id": "a", "group": 5}).encode(), "group"),
        (json.dumps({"agent_id": "a", "installed": {}}).encode(), "installed"),
        (
            json.dumps(
                {
                    "agent_id": "a",
                    "installed": [{"product": "x", "version": "1", "sha256": "nothex"}],
                }
            ).encode(),
            "installed[0].sha256",
        ),
        (
            json.dumps({"agent_id": "a", "installed": [{"version": "1", "sha256": SHA}]}).encode(),
            "installed[0].product",
        ),
        (json.dumps({"agent_id": "a", "accept_delta": "zstd"}).encode(), "accept_delta"),
        (json.dumps({"agent_id": "a", "defer_days": 2}).encode(), "defer_days"),
    ],
)
async def test_bad_checkin_body_is_400_naming_the_field(relay, body, field):
    status, answer = await post(relay, "/v1/checkin", body)
    assert status == 400
    assert answer["error"].startswith(field)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (json.dumps({"agent_id": "a"}).encode(), "events"),
        (
            json.dumps(
                {"agent_id": "a", "events": [{"product": "x", "event": "exploded"}]}
            ).encode(),
            "events[0].event",
        ),
        (
            json.dumps(
                {"agent_id": "a", "events": [{"product": "x", "event": "failed", "bytes": -1}]}
            ).encode(),
            "events[0].bytes",
        ),
        (
            json.dumps(
                {
                    "agent_id": "a",
                    "events": [{"product": "x", "event": "failed", "at": "yesterday"}],
                }
            ).encode(),
            "events[0].at",
        ),
    ],
)
async def test_bad_report_body_is_400_naming_the_field(relay, body, field):
    status, answer = await post(relay, "/v1/reports", body)
    assert status == 400
    assert answer["error"].startswith(field)


async def test_huge_body_refused_before_reading(relay):
    status, answer = await post(relay, "/v1/checkin", b"x" * (300 * 1024))
    assert status == 413 and "larger than" in answer["error"]


async def test_good_checkin_offers_and_names_relays(relay):
    body = {"agent_id": "agent-1", "installed": [], "accept_delta": ["bsdiff4", "future-format"]}
    status, answer = await post(relay, "/v1/checkin", json.dumps(body).encode())
    assert status == 200
    (offer,) = answer["offers"]
    assert offer["action"] == "install" and offer["sha256"] == SHA and offer["delta"] is None
    assert offer["mode"] == "forced" and offer["deadline"] is None
    assert answer["relays"] == [str(relay.make_url("/"))]
    assert answer["relays_only"] is False and answer["origin"].startswith("http://127.0.0.1")
    assert relay_state(relay).registry.get("agent-1").first_offered


async def test_admin_api_is_off_without_a_token(relay):
    async with (
        aiohttp.ClientSession() as s,
        s.get(relay.make_url("/v1/admin/updates"), headers={"Authorization": "Bearer x"}) as r,
    ):
        assert r.status == 404

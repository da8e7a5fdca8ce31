"""Any body or header a client can send gets a 4xx, never a 500.

Two layers: the pure parsers of the wire contract, property-based (Hypothesis); then the
running relay on loopback, fed 10,000 random requests (paths, methods, headers, bodies):
every answer is below 500, or a 503 that carries Retry-After.
"""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp
import pytest
import urllib3
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.agent.updater import retry_after
from relay.core.protocol import parse_checkin, parse_json_object, parse_reports
from relay.core.semver import Version
from relay.core.tokens import SECRET_BYTES, verify_token
from relay.errors import BodyError
from relay.publisher.repository import Repository
from tests.support import relay_config, start_relay, write_root

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=25,
)
FIELDS = ("agent_id", "group", "installed", "accept_delta", "defer_days", "events")
OBJECTS = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), JSON, max_size=6)


def _only_body_errors(parse, value) -> None:
    try:
        parse(value)
    except BodyError as e:  # anything else propagates and fails the test
        message = str(e)
        assert message, "a body error names the field"


@given(st.binary(max_size=300))
def test_json_bodies_of_any_bytes_parse_or_raise_a_body_error(raw):
    _only_body_errors(parse_json_object, raw)


@given(OBJECTS)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_checkin_bodies_parse_or_name_the_bad_field(body):
    _only_body_errors(parse_checkin, body)


@given(OBJECTS)
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_report_bodies_parse_or_name_the_bad_field(body):
    _only_body_errors(parse_reports, body)


# Text a header or a version field may hold: digits of other scripts and superscripts
# (str.isdigit() takes them, int() does not always), signs, dots, spaces, newlines.
HEADER_TEXT = st.text(
    st.sampled_from("0123456789.-+_=/ \n\u00b2\u00b3\u00b9\u0663\u0966\uff11aAzZ"), max_size=60
) | st.text(max_size=60)


@given(HEADER_TEXT, HEADER_TEXT)
@settings(max_examples=500)
def test_agent_tokens_of_any_text_are_refused_without_an_error(agent_id, token):
    assert verify_token(bytes(SECRET_BYTES), agent_id, token, 0.0) is False
    assert verify_token(bytes(SECRET_BYTES), agent_id, f"1.{token}", 0.0) is False


@given(HEADER_TEXT)
@settings(max_examples=300)
def test_the_agent_reads_any_retry_after_of_a_relay_without_an_error(value):
    answer = urllib3.HTTPResponse(body=b"", headers={"Retry-After": value}, status=503)
    wait = retry_after(answer)
    assert wait is None or (value.strip().isascii() and wait == float(value))


@given(HEADER_TEXT)
@settings(max_examples=500)
def test_versions_of_any_text_parse_or_raise_a_value_error(text):
    try:
        version = Version.parse(text)
    except ValueError:
        return
    assert text.isascii() and str(version) == text


@pytest.mark.parametrize(
    "raw",
    [
        b"[" * 100_000 + b"]" * 100_000,  # deep nesting
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b'{"agent_id": "a", "defer_days": ' + b"9" * 5000 + b"}",  # a huge number
        b'{"agent_id": "a", "defer_days": NaN}',
        b'{"agent_id": "a", "installed": "' + b"\xff\xfe" * 10 + b'"}',  # invalid UTF-8
        b'{"agent_id": "a", "installed": [' + b"{}," * 5000 + b"{}]}",  # a huge array
    ],
    ids=["deep-list", "deep-object", "huge-number", "nan", "bad-utf8", "huge-array"],
)
def test_hostile_bodies_are_body_errors(raw):
    with pytest.raises(BodyError):
        parse_checkin(parse_json_object(raw))


# -- the running relay -----------------------------------------------------------

REQUESTS = 10_000
SEED = 20261201


def _random_request(rng: random.Random, sha: str, target_url: str):
    methods = ["GET"] * 6 + ["HEAD", "POST", "POST", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]
    paths = [
        "/metadata/timestamp.json",
        "/metadata/1.root.json",
        "/metadata/" + rng.choice(["..%2f..%2fetc%2fpasswd", "x" * 300, "%00.json", "9.json"]),
        target_url,
        "/targets/" + rng.choice(["a/b/" + sha + ".bin", sha, "a/b/c", "%ff%fe"]),
        f"/deltas/{sha}/{sha}",
        f"/deltas/{sha[:10]}/{'z' * 64}",
        "/v1/checkin",
        "/v1/reports",
        "/v1/admin/updates",
        "/v1/admin/approvals",
        "/v1/admin/settings",
        "/v1/admin/agents",
        "/metrics",
        "/readyz",
        "/healthz",
        "/" + "".join(rng.choice("abc/%.~-_") for _ in range(rng.randint(0, 40))),
    ]
    headers = {}
    for name, values in (
        (
            "Range",
            [
                "bytes=0-",
                "bytes=-0",
                "bytes=5-1",
                "bytes=0-1,3-4",
                "items=1-2",
                "bytes=" + "9" * 40,
                "bytes= 1-2",
            ],
        ),
        ("If-Range", ['"x"', "Mon, 32 Foo 1999", f'"{sha}"', 'W/"a"']),
        ("If-None-Match", ["*", '"a", W/"b"', ",,,", '"' + "a" * 9000]),
        ("If-Modified-Since", ["yesterday", "Sun, 06 Nov 1994 08:49:37 GMT", "0"]),
        ("Relay-Agent-Id", ["a" * 500, "agent 1", "ok-agent", "\u00e9t\u00e9"]),
        ("Authorization", ["Bearer", "Bearer x", "Basic Zm9v", "bearer " + "t" * 1000]),
        ("Content-Type", ["application/json", "text/plain", "multipart/form-data; boundary=x"]),
        ("Accept", ["*/*", "application/vnd.relay.zstd-patch", ";;;", "a/b;q=x"]),
    ):
        if rng.random() < 0.3:
            headers[name] = rng.choice(values)
    body = None
    if rng.random() < 0.5:
        kind = rng.randrange(6)
        if kind == 0:
            body = rng.randbytes(rng.randint(0, 400))
        elif kind == 1:
            body = b"[" * 5000 + b"]" * 5000
        elif kind == 2:
            doc = {
                "agent_id": rng.choice(["a", "", 5, None, "x" * 200]),
                "group": rng.choice(["default", "", [], "g" * 100]),
                "installed": rng.choice(
                    [[], "x", [{"product": "p", "version": "1", "sha256": sha}], [1, 2]]
                ),
                "events": rng.choice([[], [{"event": "failed", "bytes": -1}], "e", [{}] * 3]),
                "defer_days": rng.choice([0, 1, 3, 7, -1, 1.5, True, "3", 10**30]),
            }
            body = json.dumps(doc).encode()
        elif kind == 3:
            body = b'{"product": "p", "version": "1", "status": "approved", "group": 5}'
        elif kind == 4:
            body = json.dumps({"x": float("nan"), "y": 1e308 * 10}).encode()
        else:
            body = b"\xff" * rng.randint(1, 50)
    return rng.choice(methods), rng.choice(paths), headers, body


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_ten_thousand_random_requests_get_no_5xx_but_503_with_retry_after(
    tmp_path, serve_origin, aiohttp_server
):
    repo = Repository.init(tmp_path / "repo")
    repo.add_bytes(b"x" * 5000, "a.bin", product="app", version="1.0.0")
    origin = await serve_origin(repo)
    root = write_root(tmp_path, repo.root_bytes(1))
    token_file = tmp_path / "admin-token"
    token_file.write_text("secret-token")
    cfg = relay_config(tmp_path, [origin.url], root, **{"admin.token_file": str(token_file)})
    relay = await start_relay(aiohttp_server, cfg)
    target = repo.targets()[0]
    sha = target.sha256
    target_url = "/targets/" + target.url_path
    rng = random.Random(SEED)
    bad: list[tuple[str, str, int]] = []
    statuses: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=32)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:

        async def one() -> None:
            method, path, headers, body = _random_request(rng, sha, target_url)
            url = str(relay.make_url("/")).rstrip("/") + path
            try:
                async with session.request(
                    method, aiohttp.client.URL(url, encoded=True), headers=headers, data=body
                ) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    if resp.status >= 500 and not (
                        resp.status == 503 and "Retry-After" in resp.headers
                    ):
                        bad.append((method, path, resp.status))
            except aiohttp.ClientResponseError as e:  # a malformed request refused at the parser
                statuses[e.status] = statuses.get(e.status, 0) + 1
                if e.status >= 500:
                    bad.append((method, path, e.status))

        for _ in range(REQUESTS // 50):
            await asyncio.gather(*(one() for _ in range(50)))
    assert sum(statuses.values()) == REQUESTS
    assert not bad, bad[:20]
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0  # the fuzz reached the handlers

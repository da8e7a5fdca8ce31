"""RFC 9110 behaviour of blob and metadata responses, checked with raw HTTP requests."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess

import pytest

from tests.support import relay_state, released

BLOB = os.urandom(10_000)
SHA = hashlib.sha256(BLOB).hexdigest()


@pytest.fixture
def repo(repo):
    return released(repo, BLOB, "pkg.bin", product="pkg", version="1.0.0")


@pytest.fixture
async def relay(repo, relay):
    relay.url_path = f"/targets/{repo.targets()[0].url_path}"
    return relay


async def raw(server, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read one response (Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(request)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def req(path: str, method: str = "GET", **headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


N = len(BLOB)
ETAG = f'"{SHA}"'


@pytest.mark.parametrize(
    ("headers", "status", "body", "content_range"),
    [
        ({}, 200, BLOB, None),
        ({"Range": "bytes=0-9"}, 206, BLOB[:10], f"bytes 0-9/{N}"),
        ({"Range": "bytes=9990-"}, 206, BLOB[9990:], f"bytes 9990-{N - 1}/{N}"),
        ({"Range": "bytes=-100"}, 206, BLOB[-100:], f"bytes {N - 100}-{N - 1}/{N}"),
        ({"Range": "bytes=-20000"}, 206, BLOB, f"bytes 0-{N - 1}/{N}"),
        ({"Range": "bytes=5000-999999"}, 206, BLOB[5000:], f"bytes 5000-{N - 1}/{N}"),
        ({"Range": f"bytes={N}-"}, 416, b"", f"bytes */{N}"),
        ({"Range": "bytes=-0"}, 416, b"", f"bytes */{N}"),
        ({"Range": "bytes=0-9,20-29"}, 200, BLOB, None),
        ({"Range": "items=0-9"}, 200, BLOB, None),
        ({"Range": "bytes= 0-9"}, 200, BLOB, None),
        ({"Range": "bytes=9-0"}, 200, BLOB, None),
        ({"Range": "bytes=0-9", "If-Range": ETAG}, 206, BLOB[:10], f"bytes 0-9/{N}"),
        ({"Range": "bytes=0-9", "If-Range": '"0000"'}, 200, BLOB, None),
        ({"Range": "bytes=0-9", "If-Range": f"W/{ETAG}"}, 200, BLOB, None),
        ({"If-None-Match": ETAG}, 304, b"", None),
        ({"If-None-Match": f'"other", {ETAG}'}, 304, b"", None),
        ({"If-None-Match": '"other"'}, 200, BLOB, None),
        ({"If-Match": '"other"'}, 412, b"", None),
    ],
)
async def test_blob_ranges_and_conditionals(relay, headers, status, body, content_range):
    got_status, got_headers, got_body = await raw(relay, req(relay.url_path, **headers))
    assert got_status == status
    assert got_body == body
    assert got_headers.get("content-range") == content_range
    if status in (200, 206, 304):
        assert got_headers["etag"] == ETAG
        assert got_headers["cache-control"] == "public, max-age=31536000, immutable"
    if status in (200, 206):
        assert int(got_headers["content-length"]) == len(body)
        assert "transfer-encoding" not in got_headers


async def test_if_range_date_form_and_if_modified_since(relay):
    _, headers, _ = await raw(relay, req(relay.url_path))
    last_modified = headers["last-modified"]
    status, h, body = await raw(
        relay, req(relay.url_path, Range="bytes=100-", If_Range=last_modified)
    )
    assert status == 206 and body == BLOB[100:]
    status, _, body = await raw(
        relay, req(relay.url_path, Range="bytes=100-", If_Range="Mon, 01 Jan 2001 00:00:00 GMT")
    )
    assert status == 200 and body == BLOB
    status, _, body = await raw(relay, req(relay.url_path, If_Modified_Since=last_modified))
    assert status == 304 and body == b""


async def test_head_has_real_length_and_ignores_range(relay):
    status, headers, body = await raw(relay, req(relay.url_path, "HEAD", Range="bytes=0-9"))
    assert status == 200
    assert int(headers["content-length"]) == N
    assert body == b""


async def test_metadata_byte_exact_and_cache_headers(relay):
    state = relay_state(relay)
    ts = state.mirror.metadata_file("timestamp.json")
    status, headers, body = await raw(relay, req("/metadata/timestamp.json"))
    assert status == 200 and body == ts
    assert "max-age=10" in headers["cache-control"]
    status, headers, body = await raw(relay, req("/metadata/1.root.json"))
    assert status == 200
    assert "immutable" in headers["cache-control"]
    status, _, _ = await raw(relay, req("/metadata/2.root.json"))
    assert status == 404  # clients rely on it: "no newer root"
    status, _, _ = await raw(relay, req("/metadata/999.snapshot.json"))
    assert status == 404


@pytest.mark.parametrize(
    "request_bytes",
    [
        req("/targets/pkg/1.0.0/" + "0" * 64 + ".pkg.bin"),  # not in the metadata
        req("/targets/pkg/1.0.0/notahash.pkg.bin"),
        req("/targets/../../etc/passwd"),
        req("/metadata/../state/x"),
        req("/metadata/%00.json"),
        req("/nothing-here"),
    ],
)
async def test_unknown_or_malformed_paths_are_404(relay, request_bytes):
    status, _, _ = await raw(relay, request_bytes)
    assert status == 404


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /metadata/timestamp.json HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        b"DELETE /targets/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /metadata/timestamp.json HTTP/1.1\r\nHost: x\r\nX-Big: "
        + b"a" * 70000
        + b"\r\nConnection: close\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET /metadata/timestamp.json HTTP/1.1\r\nHost: x\r\nRange: "
        b"bytes=" + b"1" * 5000 + b"-\r\nConnection: close\r\n\r\n",
    ],
    ids=["post", "delete", "huge-header", "garbage", "absurd-range"],
)
async def test_malformed_requests_get_4xx_not_500(relay, request_bytes):
    status, _, _ = await raw(relay, request_bytes)
    assert 400 <= status < 500 or status == 200  # the absurd Range is ignored (200)


async def test_curl_resume(relay, tmp_path):
    out = tmp_path / "partial.bin"
    out.write_bytes(BLOB[:4000])
    url = str(relay.make_url(relay.url_path))
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-f",
        "-C",
        "-",
        "-o",
        str(out),
        url,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert out.read_bytes() == BLOB
    # Resuming a complete file: 416 with an empty body; curl treats it as done.
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-C",
        "-",
        "-o",
        str(out),
        "-w",
        "%{http_code}",
        url,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    stdout, _ = await proc.communicate()
    assert stdout == b"416"
    assert out.read_bytes() == BLOB


async def test_wrong_method_on_a_known_path_is_405(relay):
    status, headers, _ = await raw(
        relay,
        b"POST /metadata/timestamp.json HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    assert status == 405
    assert "GET" in headers["allow"]

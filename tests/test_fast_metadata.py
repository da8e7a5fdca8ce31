"""The metadata fast path of ``relay serve``, over raw sockets, one and two processes.

A ``GET`` or ``HEAD`` of a served metadata file is answered before the router, with a
head serialized once per content; these tests hold it to what aiohttp's own answer
did: exact bytes, ``HEAD`` without a body, keep-alive and ``Connection: close``,
HTTP/1.0, validators and ranges, 404 and 405, the access log and the metrics. With
``relay.workers = 2`` the kernel spreads connections over the leader and the worker,
so every check runs over several new connections, and the worker's own counters show
it answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from relay.server.http import PreparedResponse, header_lines
from relay.server.run import AccessHandler, AccessLogger
from tests.support import free_port, start_relay_process, stop_process

CONNECTIONS = 6  # per check, so that both processes answer some (relay.workers = 2)
WORKER_TRIES = 40


@dataclass
class Served:
    """A running ``relay serve`` (JSON logs, access log on) and where it listens."""

    proc: asyncio.subprocess.Process
    port: int
    data_dir: Path
    log: Path
    processes: int

    @property
    def url(self) -> str:
        """Its base URL."""
        return f"http://127.0.0.1:{self.port}"

    def access(self, path: str) -> list[dict[str, Any]]:
        """The JSON access records of ``path`` logged so far."""
        lines = self.log.read_text().splitlines()
        records = [json.loads(line) for line in lines if line.startswith("{")]
        return [r for r in records if r.get("logger") == "relay.access" and r["path"] == path]


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, origin: Any, root_file: Path, processes: int, env: dict[str, str]
) -> AsyncIterator[Served]:
    """``relay serve`` with ``relay.workers = processes`` (JSON logs), synced with ``origin``.

    ``env`` adds ``RELAY_*`` variables. With a worker, it is listening once this yields.
    """
    port = free_port()
    data_dir = tmp_path / "data"
    log = tmp_path / "relay.log"
    args = ["--upstream", origin.url, "--trusted-root", str(root_file)]
    values = {"RELAY_RELAY__WORKERS": str(processes), "RELAY_RELAY__LOG_FORMAT": "json", **env}
    with log.open("wb") as stderr:
        proc = await start_relay_process(
            [*args, "--data-dir", str(data_dir)], port, env=values, stderr=stderr
        )
    relay = Served(proc, port, data_dir, log, processes)
    try:
        if processes > 1:
            for _ in range(600):
                if "1 of 1 worker processes listening" in log.read_text():
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the worker did not start")
        yield relay
    finally:
        assert await stop_process(proc)


@pytest.fixture(params=[1, 2], ids=["one-process", "two-processes"])
async def served(request, tmp_path, origin, root_file) -> AsyncIterator[Served]:
    """``relay serve`` with ``relay.workers`` 1 or 2 and its access log, synced with ``origin``."""
    env = {"RELAY_RELAY__ACCESS_LOG": "true"}
    async with serving(tmp_path, origin, root_file, request.param, env) as relay:
        yield relay


@dataclass
class Answer:
    """One response read off a socket."""

    status_line: str
    headers: dict[str, str]  # names lowercased; each appears once here
    body: bytes
    interim: list[str]  # the status lines of 1xx answers before it


class Conn:
    """One client connection, speaking raw HTTP/1.x."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, relay: Served) -> Conn:
        """A new connection to ``relay``."""
        return cls(*await asyncio.open_connection("127.0.0.1", relay.port))

    async def ask(
        self, target: str, *, method: str = "GET", version: str = "1.1", **headers: str
    ) -> Answer:
        """Send one request, read its whole answer (no body for ``HEAD``, 304 or 416)."""
        lines = [f"{method} {target} HTTP/{version}", "Host: relay"]
        lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        interim = []
        while True:
            head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
            status_line, *fields = head.decode("latin-1").split("\r\n")[:-2]
            if not status_line.split()[1].startswith("1"):
                break
            interim.append(status_line)
        names = [f.split(":", 1)[0].lower() for f in fields]
        assert len(names) == len(set(names)), f"a header repeated: {fields}"
        parsed = {n: f.split(":", 1)[1].strip() for n, f in zip(names, fields, strict=True)}
        status = int(status_line.split()[1])
        length = int(parsed.get("content-length", "0"))
        bodiless = method == "HEAD" or status in (204, 304)
        body = b"" if bodiless else await asyncio.wait_for(self.reader.readexactly(length), 10)
        return Answer(status_line, parsed, body, interim)

    async def closed_by_server(self) -> bool:
        """Whether the server closes the connection (EOF, nothing more sent)."""
        return await asyncio.wait_for(self.reader.read(1), 10) == b""

    async def close(self) -> None:
        """Close this side."""
        self.writer.close()
        await self.writer.wait_closed()


def _metadata(repo) -> dict[str, bytes]:
    folder = repo.public_dir / "metadata"
    return {p.name: p.read_bytes() for p in folder.glob("*.json")}


async def _metrics(relay: Served) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{relay.url}/metrics") as r:
        assert r.status == 200
        return await r.text()


async def _worker_metrics(relay: Served) -> str:
    sock = relay.data_dir / "run" / "worker-1.sock"
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as s,
        s.get("http://worker/internal/metrics") as r,
    ):
        assert r.status == 200
        return await r.text()


def _sample(text: str, name: str, **labels: str) -> float:
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series == want:
            return float(value)
    return 0.0


def _expect_file(answer: Answer, name: str, data: bytes, *, method: str = "GET") -> None:
    assert answer.status_line == "HTTP/1.1 200 OK"
    h = answer.headers
    assert h["etag"] == f'"{hashlib.sha256(data).hexdigest()}"'
    assert h["content-type"] == "application/json"
    assert h["content-length"] == str(len(data))
    assert h["accept-ranges"] == "bytes"
    max_age = "max-age=10" if name == "timestamp.json" else "immutable"
    assert max_age in h["cache-control"]
    assert parsedate_to_datetime(h["date"]).tzinfo is not None
    assert h["server"].startswith("Python/")
    assert "connection" not in h  # HTTP/1.1, kept alive
    assert answer.body == (b"" if method == "HEAD" else data)


@pytest.mark.timeout(120)
async def test_files_byte_exact_head_without_body_and_keep_alive(served, repo):
    files = _metadata(repo)
    for _ in range(CONNECTIONS):
        conn = await Conn.open(served)
        for name, data in files.items():
            _expect_file(await conn.ask(f"/metadata/{name}"), name, data)
            head = await conn.ask(f"/metadata/{name}", method="HEAD")
            _expect_file(head, name, data, method="HEAD")
        # Had HEAD sent a body, this answer would start inside it.
        _expect_file(
            await conn.ask("/metadata/timestamp.json"), "timestamp.json", files["timestamp.json"]
        )
        await conn.close()


@pytest.mark.timeout(120)
async def test_connection_close_and_http_1_0(served, repo):
    data = _metadata(repo)["1.root.json"]
    for _ in range(CONNECTIONS):
        conn = await Conn.open(served)
        answer = await conn.ask("/metadata/1.root.json", Connection="close")
        assert answer.headers["connection"] == "close"
        assert answer.body == data
        assert await conn.closed_by_server()
        await conn.close()

        conn = await Conn.open(served)
        answer = await conn.ask("/metadata/1.root.json", version="1.0")
        assert answer.status_line == "HTTP/1.0 200 OK"
        assert "connection" not in answer.headers
        assert answer.body == data
        assert await conn.closed_by_server()  # HTTP/1.0 without keep-alive
        await conn.close()

        conn = await Conn.open(served)
        for _ in range(2):
            answer = await conn.ask("/metadata/1.root.json", version="1.0", Connection="keep-alive")
            assert answer.status_line == "HTTP/1.0 200 OK"
            assert answer.headers["connection"] == "keep-alive"
            assert answer.body == data
        await conn.close()


@pytest.mark.timeout(120)
async def test_validators_ranges_unknown_names_and_methods(served, repo):
    data = _metadata(repo)["timestamp.json"]
    etag = f'"{hashlib.sha256(data).hexdigest()}"'
    for _ in range(CONNECTIONS):
        conn = await Conn.open(served)
        answer = await conn.ask("/metadata/timestamp.json", If_None_Match=etag)
        assert answer.status_line == "HTTP/1.1 304 Not Modified"
        assert answer.headers["etag"] == etag
        answer = await conn.ask("/metadata/timestamp.json", Range="bytes=0-9")
        assert answer.status_line == "HTTP/1.1 206 Partial Content"
        assert answer.headers["content-range"] == f"bytes 0-9/{len(data)}"
        assert answer.body == data[:10]
        answer = await conn.ask("/metadata/timestamp.json", Range=f"bytes={len(data)}-")
        assert answer.status_line.startswith("HTTP/1.1 416 ")
        assert answer.headers["content-range"] == f"bytes */{len(data)}"
        answer = await conn.ask("/metadata/timestamp.json", Range="bytes=0-9", If_Range='"other"')
        assert (answer.status_line, answer.body) == ("HTTP/1.1 200 OK", data)
        answer = await conn.ask("/metadata/timestamp.json", Expect="100-continue")
        assert answer.interim == ["HTTP/1.1 100 Continue"]  # the application's route
        assert answer.body == data
        # Percent-encoding and a query, as the router reads them.
        assert (await conn.ask("/metadata/%74imestamp.json")).body == data
        assert (await conn.ask("/metadata/timestamp.json?x=1")).body == data
        for target in ("/metadata/99.root.json", "/metadata/not-metadata", "/metadata/a/b.json"):
            answer = await conn.ask(target)
            assert answer.status_line == "HTTP/1.1 404 Not Found", target
        answer = await conn.ask("/metadata/timestamp.json", method="POST", Content_Length="0")
        assert answer.status_line == "HTTP/1.1 405 Method Not Allowed"
        await conn.close()


@pytest.mark.timeout(120)
async def test_access_log_and_metrics_count_every_answer(served, repo):
    data = _metadata(repo)["timestamp.json"]
    path = "/metadata/timestamp.json"
    before = await _metrics(served)
    asked = 0
    for _ in range(WORKER_TRIES):
        conn = await Conn.open(served)
        assert (await conn.ask(path)).body == data
        assert (await conn.ask(path, method="HEAD")).body == b""
        await conn.close()
        asked += 1
        if served.processes == 1 or _sample(
            await _worker_metrics(served),
            "relay_http_requests_total",
            route="metadata",
            status="200",
        ):
            break
    else:
        pytest.fail(f"{WORKER_TRIES} connections and the worker never answered metadata itself")
    for _ in range(100):  # a line is written just after the answer went out
        records = served.access(path)
        if len(records) >= 2 * asked:
            break
        await asyncio.sleep(0.05)
    assert Counter(r["method"] for r in records) == {"GET": asked, "HEAD": asked}
    for record in records:
        assert record["status"] == 200
        assert record["bytes"] == (len(data) if record["method"] == "GET" else 0)
    if served.processes > 1:  # the worker logged what it answered
        assert any(r["pid"] != served.proc.pid for r in records)
    after = await _metrics(served)

    def grew(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert grew("relay_http_requests_total", route="metadata", status="200") == 2 * asked
    assert grew("relay_bytes_served_total", source="metadata") == len(data) * asked


def test_header_lines_refuse_a_line_break():
    assert header_lines([("ETag", '"x"'), ("Content-Length", "4")]) == (
        b'ETag: "x"\r\nContent-Length: 4\r\n'
    )
    with pytest.raises(ValueError, match="line break"):
        header_lines([("X", "a\r\nInjected: 1")])
    with pytest.raises(ValueError, match="line break"):
        header_lines([("X", "a\nb")])


@pytest.mark.parametrize("json_lines", [False, True], ids=["text", "json"])
async def test_access_lines_straight_to_the_handler_or_as_records(json_lines):
    """Lines skip the log record while the access handler is alone; a filter gets records."""
    body = b'{"signed":{}}'
    fields = header_lines([("Content-Type", "application/json"), ("Content-Length", "13")])

    async def handler(_request: web.Request) -> web.StreamResponse:
        return PreparedResponse(fields, body)

    app = web.Application()
    app.router.add_get("/metadata/x.json", handler)
    stream = io.StringIO()
    access = AccessHandler(json_lines=json_lines, pid=True)
    access.setStream(stream)
    logger = logging.getLogger(f"tests.access.{json_lines}")
    logger.handlers[:] = [access]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    seen: list[logging.LogRecord] = []
    runner = web.AppRunner(app, access_log_class=AccessLogger, access_log=logger)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as s:
            for method in ("GET", "HEAD"):
                async with s.request(method, f"http://127.0.0.1:{port}/metadata/x.json") as r:
                    assert (r.status, await r.read()) == (200, body if method == "GET" else b"")
            logger.addFilter(lambda record: seen.append(record) or True)
            async with s.get(f"http://127.0.0.1:{port}/metadata/x.json") as r:
                assert await r.read() == body
    finally:
        await runner.cleanup()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3  # noqa: PLR2004 - GET, HEAD, then GET through a record
    assert len(seen) == 1
    if json_lines:
        records = [json.loads(line) for line in lines]
        assert [(r["method"], r["status"], r["bytes"]) for r in records] == [
            ("GET", 200, len(body)),
            ("HEAD", 200, 0),
            ("GET", 200, len(body)),
        ]
        assert {r["pid"] for r in records} == {os.getpid()}
        assert records[0]["message"].startswith("127.0.0.1 - - [")
    else:
        assert [line.split('" ', 1)[1].split(" ")[:2] for line in lines] == [
            ["200", str(len(body))],
            ["200", "-"],
            ["200", str(len(body))],
        ]
        assert '"HEAD /metadata/x.json HTTP/1.1"' in lines[1]

"""``relay.workers = 2``: a leader and a worker process serve one port as one relay.

Real ``relay serve`` processes on loopback, real clients on separate connections; the
kernel spreads connections over both processes (``SO_REUSEPORT``). Which process
answered is read from the JSON access log (each line carries its ``pid``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support import Fault, free_port, start_relay_process, stop_process

SIZE = 1024 * 1024
CLIENTS = 16
SPREAD_TRIES = 3


@dataclass
class Relay:
    """A ``relay serve`` process with its worker; ``log`` holds its stderr (both processes)."""

    proc: asyncio.subprocess.Process
    url: str
    data_dir: Path
    log: Path

    def records(self) -> list[dict[str, Any]]:
        """The JSON log records written so far."""
        lines = self.log.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    async def wait_for(self, message: str, timeout: float = 30) -> dict[str, Any]:
        """The first log record whose message contains ``message`` (bounded wait)."""
        for _ in range(int(timeout / 0.05)):
            for record in self.records():
                if message in record.get("message", ""):
                    return record
            await asyncio.sleep(0.05)
        raise AssertionError(f"not logged: {message!r}")

    def access_lines(self, path: str) -> list[dict[str, Any]]:
        """The JSON access records of ``path`` logged so far."""
        return [
            r for r in self.records() if r.get("logger") == "relay.access" and r.get("path") == path
        ]


@pytest.fixture
async def relay_workers(tmp_path, origin, root_file) -> AsyncIterator[Callable[..., Any]]:
    """Start ``relay serve`` with ``relay.workers = 2`` (JSON logs, access log on)."""
    started: list[asyncio.subprocess.Process] = []

    async def go(**env: str) -> Relay:
        port = free_port()
        data_dir = tmp_path / "data"
        log = tmp_path / f"relay-{len(started)}.log"
        args = ["--upstream", origin.url, "--trusted-root", str(root_file)]
        with log.open("wb") as stderr:
            proc = await start_relay_process(
                [*args, "--data-dir", str(data_dir)],
                port,
                env={
                    "RELAY_RELAY__WORKERS": "2",
                    "RELAY_RELAY__LOG_FORMAT": "json",
                    "RELAY_RELAY__ACCESS_LOG": "true",
                    # Every client here is 127.0.0.1 without a token: one "agent".
                    "RELAY_LIMITS__MAX_TRANSFERS_PER_AGENT": "0",
                    **env,
                },
                stderr=stderr,
            )
        started.append(proc)
        relay = Relay(proc, f"http://127.0.0.1:{port}/", data_dir, log)
        await relay.wait_for("1 of 1 worker processes listening")
        return relay

    yield go
    for proc in started:
        if not await stop_process(proc):
            raise TimeoutError(f"relay process {proc.pid} ignored SIGTERM for 20 s")


async def _get(url: str, **headers: str) -> tuple[int, bytes]:
    # A session of its own: a new connection, which the kernel gives to either process.
    async with aiohttp.ClientSession() as s, s.get(url, headers=headers) as r:
        return r.status, await r.read()


@pytest.mark.timeout(120)
async def test_a_cold_blob_through_both_processes_is_fetched_once(repo, origin, relay_workers):
    blobs = [os.urandom(SIZE) for _ in range(SPREAD_TRIES)]
    targets = [
        repo.add_bytes(b, "big.bin", product=f"big{i}", version="1.0.0")
        for i, b in enumerate(blobs)
    ]
    relay = await relay_workers()
    for blob, tgt in zip(blobs, targets, strict=True):
        path = f"targets/{tgt.url_path}"
        # The origin holds the blob mid-way, so every client arrives during the one fill.
        fault = Fault(pause_at=SIZE // 2, paused=asyncio.Event(), resume=asyncio.Event())
        origin.faults[path] = fault
        clients = [asyncio.create_task(_get(relay.url + path)) for _ in range(CLIENTS)]
        await asyncio.wait_for(fault.paused.wait(), 30)
        await asyncio.sleep(0.5)  # the others connect and join the fill
        fault.resume.set()
        answers = await asyncio.gather(*clients)
        assert origin.hits[path] == 1
        for status, body in answers:
            assert status == 200
            assert hashlib.sha256(body).hexdigest() == tgt.sha256
        pids = {r["pid"] for r in await _logged(relay, "/" + path, CLIENTS)}
        if len(pids) == 2:  # noqa: PLR2004 - the leader and its worker
            return
    pytest.fail(f"{SPREAD_TRIES} spreads of {CLIENTS} connections all went to one process")


async def _logged(relay: Relay, path: str, count: int) -> list[dict[str, Any]]:
    # An access line is written just after the client read the last byte.
    for _ in range(100):
        lines = relay.access_lines(path)
        if len(lines) >= count:
            return lines
        await asyncio.sleep(0.05)
    return relay.access_lines(path)

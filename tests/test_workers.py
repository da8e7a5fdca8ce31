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
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.core.protocol import MEDIA_TYPES, DeltaFormat
from relay.deltas.formats import apply_patch_bytes
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

    async def go(*extra: str, **env: str) -> Relay:
        port = free_port()
        data_dir = tmp_path / "data"
        log = tmp_path / f"relay-{len(started)}.log"
        args = ["--upstream", origin.url, "--trusted-root", str(root_file)]
        with log.open("wb") as stderr:
            proc = await start_relay_process(
                [*args, "--data-dir", str(data_dir), *extra],
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


async def _worker_pid(relay: Relay, not_pid: int = 0) -> int:
    """The PID of worker 1 listening (another than ``not_pid``: started again)."""
    for _ in range(600):
        for record in relay.records():
            message = record.get("message", "")
            if message.startswith("worker 1 (pid ") and message.endswith(") listening"):
                pid = int(message.split("(pid ")[1].split(")")[0])
                if pid != not_pid:
                    return pid
        await asyncio.sleep(0.05)
    raise AssertionError("worker 1 is not listening")


async def worker_metrics(relay: Relay, slot: int = 1) -> str:
    """The metrics text of worker ``slot``, from its own socket."""
    sock = relay.data_dir / "run" / f"worker-{slot}.sock"
    connector = aiohttp.UnixConnector(path=str(sock))
    async with (
        aiohttp.ClientSession(connector=connector) as s,
        s.get("http://worker/internal/metrics") as r,
    ):
        assert r.status == 200
        return await r.text()


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one series in a metrics text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series == (f"{name}{{{want}}}" if want else name):
            return float(value)
    return 0.0


async def _until_worker_answers(relay: Relay, route: str, status: int, ask) -> list[Any]:
    """Ask (a new connection each time) until the worker answered ``route`` with ``status``
    itself at least once, a bounded number of times; every answer is returned."""
    answers = []
    for _ in range(40):
        answers.append(await ask())
        if _sample(
            await worker_metrics(relay),
            "relay_http_requests_total",
            route=route,
            status=str(status),
        ):
            return answers
    pytest.fail(f"40 connections and the worker never answered {route} {status} itself")


@pytest.mark.timeout(120)
async def test_a_worker_serves_metadata_and_stored_blobs_byte_exact(repo, origin, relay_workers):
    blob = os.urandom(SIZE)
    tgt = repo.add_bytes(blob, "app.bin", product="app", version="1.0.0")
    relay = await relay_workers()
    path = f"targets/{tgt.url_path}"
    assert await _get(relay.url + path) == (200, blob)  # stored now, by the leader
    timestamp = (repo.public_dir / "metadata" / "timestamp.json").read_bytes()
    etag = f'"{hashlib.sha256(timestamp).hexdigest()}"'

    answers = await _until_worker_answers(
        relay, "metadata", 200, lambda: _get(relay.url + "metadata/timestamp.json")
    )
    assert set(answers) == {(200, timestamp)}
    answers = await _until_worker_answers(
        relay,
        "metadata",
        304,
        lambda: _get(relay.url + "metadata/timestamp.json", **{"If-None-Match": etag}),
    )
    assert set(answers) == {(304, b"")}
    answers = await _until_worker_answers(relay, "targets", 200, lambda: _get(relay.url + path))
    assert set(answers) == {(200, blob)}
    answers = await _until_worker_answers(
        relay, "targets", 206, lambda: _get(relay.url + path, Range="bytes=1000-99999")
    )
    assert set(answers) == {(206, blob[1000:100000])}
    answers = await _until_worker_answers(
        relay,
        "targets",
        304,
        lambda: _get(relay.url + path, **{"If-None-Match": f'"{tgt.sha256}"'}),
    )
    assert set(answers) == {(304, b"")}
    assert origin.hits[path] == 1
    # One /metrics for the relay: the worker's answers are in the leader's merged counts.
    local = _sample(
        await worker_metrics(relay), "relay_http_requests_total", route="targets", status="304"
    )
    _, text = await _get(relay.url + "metrics")
    merged = text.decode()
    assert _sample(merged, "relay_worker_up", slot="1") == 1
    assert _sample(merged, "relay_http_requests_total", route="targets", status="304") >= local


@pytest.mark.timeout(120)
async def test_checkins_and_reports_through_a_worker_reach_the_leaders_registry(
    repo, relay_workers
):
    repo.add_bytes(b"v1", "app.bin", product="app", version="1.0.0")
    relay = await relay_workers(RELAY_ADMIN__TOKEN="secret-admin-token")
    worker = await _worker_pid(relay)
    agents = [f"agent-{i}" for i in range(12)]
    for agent in agents:
        async with aiohttp.ClientSession() as s:
            body = {"agent_id": agent, "installed": []}
            # A client cannot choose the address it is recorded under.
            spoof = {"Relay-Client-Address": "203.0.113.9"}
            async with s.post(relay.url + "v1/checkin", json=body, headers=spoof) as r:
                assert r.status == 200
                token = (await r.json())["agent_token"]
        async with aiohttp.ClientSession() as s:
            event = {"product": "app", "to_version": "1.0.0", "event": "installed"}
            headers = {"Relay-Agent-Id": agent, "Relay-Agent-Token": token}
            body = {"agent_id": agent, "events": [event]}
            async with s.post(relay.url + "v1/reports", json=body, headers=headers) as r:
                assert r.status == 202
    async with aiohttp.ClientSession() as s:
        for _ in range(8):  # neither process answers them from TCP
            async with s.get(relay.url + "internal/v1/settings") as r:
                assert r.status == 404
    pids = {r["pid"] for r in relay.access_lines("/v1/checkin")}
    assert worker in pids  # 12 connections: all to the leader is a 1 in 4096 chance
    admin = {"Authorization": "Bearer secret-admin-token"}
    async with aiohttp.ClientSession(headers=admin) as s:
        for agent in agents:
            async with s.get(f"{relay.url}v1/admin/agents/{agent}") as r:
                assert r.status == 200
                record = await r.json()
            assert record["address"] == "127.0.0.1"  # the client's, not the Unix socket's
            assert record["events"][0]["event"] == "installed"  # the report, recorded


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"  # a zombie has exited


async def _gone(pid: int) -> bool:
    for _ in range(200):
        if not _running(pid):
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.mark.timeout(120)
async def test_a_killed_worker_is_started_again_and_sigterm_stops_every_process(relay_workers):
    relay = await relay_workers()
    first = await _worker_pid(relay)
    os.kill(first, signal.SIGKILL)
    died = await relay.wait_for(f"worker 1 (pid {first}) exited with signal SIGKILL")
    assert died["level"] == "warning"
    new = await _worker_pid(relay, not_pid=first)
    assert _running(new)
    async with aiohttp.ClientSession() as s, s.get(relay.url + "metrics") as r:
        assert _sample(await r.text(), "relay_worker_restarts_total") == 1

    relay.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(relay.proc.wait(), 30) == 0
    assert await _gone(new)
    assert list((relay.data_dir / "run").glob("*.sock")) == []  # no socket left behind


@pytest.mark.timeout(120)
async def test_sighup_changes_the_egress_rate_in_the_workers(tmp_path, relay_workers):
    config = tmp_path / "relay.toml"
    config.write_text('[limits]\negress = "50MB"\nper_agent = "5MB"\n')
    relay = await relay_workers("--config", str(config))
    text = await worker_metrics(relay)
    limit = "relay_bandwidth_limit_bytes_per_second"
    assert _sample(text, limit, limit="per_agent") == 5e6
    assert _sample(text, limit, limit="egress") == 50e6
    config.write_text('[limits]\negress = "40MB"\nper_agent = "2MB"\n')
    relay.proc.send_signal(signal.SIGHUP)
    for _ in range(200):
        text = await worker_metrics(relay)
        if _sample(text, limit, limit="per_agent") == 2e6:  # noqa: PLR2004
            break
        await asyncio.sleep(0.05)
    assert _sample(text, limit, limit="per_agent") == 2e6
    assert _sample(text, limit, limit="egress") == 40e6  # the cap (the process paces at its share)
    assert await relay.wait_for("worker 1: settings of the leader applied")


@pytest.mark.timeout(120)
async def test_a_worker_serves_the_patches_the_leader_made(repo, relay_workers):
    old = os.urandom(200_000)
    new = old[:1000] + os.urandom(100) + old[1000:]
    repo.add_bytes(old, "app.bin", product="app", version="1.0.0")
    tgt = repo.add_bytes(new, "app.bin", product="app", version="1.1.0")
    # Prefetch both versions: the leader diffs them after the sync.
    relay = await relay_workers(RELAY_SYNC__PREFETCH="all")
    src = hashlib.sha256(old).hexdigest()
    url = f"{relay.url}deltas/{src}/{tgt.sha256}"
    accept = {"Accept": MEDIA_TYPES[DeltaFormat.ZSTD]}
    computed = {"format": "zstd", "outcome": "computed"}
    for _ in range(600):  # the leader has it in its index (a worker may see the file first)
        _, text = await _get(relay.url + "metrics")
        if _sample(text.decode(), "relay_delta_patches_total", **computed):
            break
        await asyncio.sleep(0.05)
    answers = await _until_worker_answers(relay, "deltas", 200, lambda: _get(url, **accept))
    for status, patch in answers:
        assert status == 200
        out = apply_patch_bytes(
            old, patch, DeltaFormat.ZSTD, expected_length=len(new), expected_sha256=tgt.sha256
        )
        assert out == new


@pytest.mark.timeout(120)
async def test_a_worker_stops_when_its_leader_is_killed(relay_workers):
    relay = await relay_workers()
    worker = await _worker_pid(relay)
    relay.proc.send_signal(signal.SIGKILL)
    await relay.proc.wait()
    assert await _gone(worker)  # PR_SET_PDEATHSIG, or its changes poll failing


@pytest.mark.timeout(120)
async def test_a_blob_the_leaders_scrub_sets_aside_is_no_longer_served_by_a_worker(
    repo, relay_workers
):
    blob = os.urandom(SIZE)
    tgt = repo.add_bytes(blob, "app.bin", product="app", version="1.0.0")
    relay = await relay_workers(RELAY_STORE__SCRUB_INTERVAL="1")
    url = f"{relay.url}targets/{tgt.url_path}"
    assert await _get(url) == (200, blob)  # stored by the leader
    await _until_worker_answers(relay, "targets", 200, lambda: _get(url))  # found by the worker
    # Damage the stored file in place, as a failing disk would: the same file the worker has
    # open. The leader's scrub finds it and sets it aside; the worker must not serve it on.
    stored = relay.data_dir / "blobs" / "sha256" / tgt.sha256[:2] / tgt.sha256[2:]
    with stored.open("r+b") as f:
        f.seek(SIZE // 2)
        byte = f.read(1)
        f.seek(SIZE // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    await relay.wait_for(f"stored blob {tgt.sha256} is damaged")
    good = 0
    for _ in range(60):  # a moment for the worker to hear of it, then only the right bytes
        good = good + 1 if await _get(url) == (200, blob) else 0
        if good == 12:  # noqa: PLR2004 - twelve connections in a row, both processes
            break
    assert good == 12  # noqa: PLR2004

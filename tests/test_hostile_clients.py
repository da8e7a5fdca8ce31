"""Hostile clients against a real ``relay serve`` process; a legitimate agent alongside.

Each test starts a relay process with small limits, attacks it from this process,
and meanwhile a legitimate agent (checked in, sending its token, waiting out
``503 Retry-After`` as the reference agent does) fetches a target. In every test:

* the legitimate agent is served, within :data:`SERVED_WITHIN` seconds (a
  correctness bound, far above the normal milliseconds, not a timing measure);
* the relay's resident memory (``VmRSS``) grows by less than :data:`RSS_GROWTH`;
* ``/metrics`` holds fewer than :data:`MAX_SERIES` series;
* the relay's log holds no traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from relay.publisher.repository import Repository
from tests.support import Origin, free_port, start_relay_process, stop_process, write_root

SERVED_WITHIN = 5.0  # seconds
RSS_GROWTH = 64 * 1024 * 1024  # bytes
MAX_SERIES = 400
BIG = 8 * 1024 * 1024  # bytes: more than loopback socket buffers hold

pytestmark = pytest.mark.timeout(60)


@dataclass
class Relay:
    proc: asyncio.subprocess.Process
    port: int
    data_dir: Path
    paths: dict[str, str]  # name -> /targets/... path
    blobs: dict[str, bytes]
    log: list[str] = field(default_factory=list)
    tracebacks: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    async def metrics(self) -> dict[str, float]:
        async with aiohttp.ClientSession() as s, s.get(f"{self.base}/metrics") as r:
            text = await r.text()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


@pytest.fixture
def repo(tmp_path):
    repo = Repository.init(tmp_path / "repo")
    rng = random.Random(7)
    small = rng.randbytes(100_000)
    repo.add_bytes(small, "app.bin", product="app", version="1.0.0")
    repo.add_bytes(
        small[:50_000] + rng.randbytes(50_000), "app.bin", product="app", version="1.1.0"
    )
    repo.add_bytes(
        small[:20_000] + rng.randbytes(80_000), "app.bin", product="app", version="1.2.0"
    )
    repo.add_bytes(rng.randbytes(BIG), "big.bin", product="big", version="1.0.0")
    return repo


@contextlib.asynccontextmanager
async def relay_process(tmp_path, repo, aiohttp_server, **env):
    origin = Origin(repo.public_dir)
    server = await aiohttp_server(origin.app())
    root = write_root(tmp_path, repo.root_bytes(1))
    data_dir = tmp_path / "data"
    args = ["--upstream", str(server.make_url("/")), "--trusted-root", str(root)]
    args += ["--data-dir", str(data_dir)]
    values = {"RELAY_LIMITS__RETRY_AFTER": "1", "RELAY_RELAY__ACCESS_LOG": "false"}
    values.update({f"RELAY_{k.upper()}": str(v) for k, v in env.items()})
    port = free_port()
    proc = await start_relay_process(args, port, env=values)
    paths, blobs = {}, {}
    for t in repo.targets():
        name = f"{t.product}-{t.version}"
        paths[name] = f"/targets/{t.url_path}"
        blobs[name] = (repo.public_dir / "targets" / t.url_path).read_bytes()
    relay = Relay(proc, port, data_dir, paths, blobs)
    drain = asyncio.create_task(drain_log(proc, relay))
    try:
        yield relay
    finally:
        drain.cancel()
        await stop_process(proc)


async def drain_log(proc: asyncio.subprocess.Process, relay: Relay) -> None:
    """Keep the relay's log flowing (a full pipe would stop it), counting its lines."""
    assert proc.stderr is not None
    while line := await proc.stderr.readline():
        relay.log.append(line.decode(errors="replace"))
        if b"Traceback" in line:
            relay.tracebacks += 1


class Agent:
    """A legitimate agent: checks in, sends its token, waits out 503 Retry-After."""

    def __init__(self, relay: Relay, agent_id: str = "legit-1") -> None:
        self.relay = relay
        self.agent_id = agent_id
        self.headers = {"Relay-Agent-Id": agent_id}

    async def request(self, s, method, path, **kwargs):
        deadline = time.monotonic() + SERVED_WITHIN
        while True:
            try:
                async with s.request(
                    method, f"{self.relay.base}{path}", headers=self.headers, **kwargs
                ) as r:
                    body = await r.read()
                    if r.status != 503 or time.monotonic() >= deadline:
                        return r.status, body
                    wait = float(r.headers.get("Retry-After", "1"))
            except aiohttp.ClientError:
                wait = 0.2  # a connection closed under us: ask again
            await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))

    async def checkin(self, s):
        status, body = await self.request(
            s, "POST", "/v1/checkin", json={"agent_id": self.agent_id, "installed": []}
        )
        assert status == 200, body
        import json

        self.headers["Relay-Agent-Token"] = json.loads(body)["agent_token"]

    async def served(self, name: str = "app-1.0.0") -> float:
        """Check in and fetch ``name``; return the seconds it took (asserts success)."""
        started = time.monotonic()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
            await self.checkin(s)
            status, body = await self.request(s, "GET", self.relay.paths[name])
        took = time.monotonic() - started
        assert status == 200
        assert hashlib.sha256(body).digest() == hashlib.sha256(self.relay.blobs[name]).digest()
        assert took < SERVED_WITHIN, f"served in {took:.1f} s"
        return took


async def check_bounds(relay: Relay, rss_before: int) -> dict[str, float]:
    metrics = await relay.metrics()
    assert len(metrics) < MAX_SERIES, len(metrics)
    grown = relay.rss() - rss_before
    assert grown < RSS_GROWTH, f"RSS grew by {grown / 2**20:.0f} MiB"
    assert relay.tracebacks == 0, "".join(relay.log[-80:])  # refusals are expected events
    return metrics


async def warm(relay: Relay) -> int:
    """Fetch every target once (so the attack does not pay for fills), return RSS."""
    agent = Agent(relay, "warm-up")
    for name in relay.paths:
        await agent.served(name)
    return relay.rss()


async def raw(port: int, rcvbuf: int | None = None):
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    # A small stream buffer too, so a slow reader's client holds little unread data.
    return await asyncio.open_connection(sock=sock, limit=1024 if rcvbuf else 2**16)


def closed(metrics: dict[str, float], reason: str) -> float:
    return metrics.get(f'relay_connections_closed_total{{reason="{reason}"}}', 0.0)


# -- the attacks ----------------------------------------------------------------


async def test_unterminated_headers(tmp_path, repo, aiohttp_server):
    async with relay_process(tmp_path, repo, aiohttp_server) as relay:
        rss = await warm(relay)
        line = b"X-Filler: " + b"a" * 8000 + b"\r\n"

        async def attacker():
            reader, writer = await raw(relay.port)
            try:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                for _ in range(125):  # 1 MB of headers that never end
                    writer.write(line)
                    await writer.drain()
            except OSError:
                pass  # closed by the relay (431): what we want
            finally:
                writer.close()

        attack = [asyncio.create_task(attacker()) for _ in range(400)]
        await asyncio.sleep(0.5)
        await Agent(relay).served()
        await asyncio.gather(*attack)
        metrics = await check_bounds(relay, rss)
        assert closed(metrics, "head_too_large") >= 1


async def test_slowloris(tmp_path, repo, aiohttp_server):
    async with relay_process(tmp_path, repo, aiohttp_server, limits__header_timeout="2s") as relay:
        rss = await warm(relay)
        ended = []

        async def attacker():
            reader, writer = await raw(relay.port)
            started = time.monotonic()

            async def answer():
                try:
                    return await reader.read()
                except OSError:
                    return b""

            answered = asyncio.create_task(answer())
            with contextlib.suppress(OSError):
                for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                    if answered.done():
                        break
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.5)
            ended.append((time.monotonic() - started, await answered))
            writer.close()

        attack = [asyncio.create_task(attacker()) for _ in range(300)]
        await asyncio.sleep(1)
        await Agent(relay).served()
        await asyncio.wait_for(asyncio.gather(*attack), 15)
        # Every slow head was cut at the deadline (2 s, with the tick of the sender).
        assert all(took < 6 for took, _answer in ended)
        assert any(answer.startswith(b"HTTP/1.1 408") for _took, answer in ended)
        metrics = await check_bounds(relay, rss)
        assert closed(metrics, "header_timeout") >= 300


async def test_idle_connections_past_the_cap(tmp_path, repo, aiohttp_server):
    async with relay_process(
        tmp_path, repo, aiohttp_server, limits__max_connections=200, limits__idle_timeout="60s"
    ) as relay:
        rss = await warm(relay)
        idle = [await raw(relay.port) for _ in range(600)]  # three times the cap
        await asyncio.sleep(0.2)
        await Agent(relay).served()
        metrics = await check_bounds(relay, rss)
        assert metrics["relay_connections"] <= 200
        assert closed(metrics, "evicted") >= 400
        for _reader, writer in idle:
            writer.close()


async def test_slow_readers_with_forged_ids(tmp_path, repo, aiohttp_server):
    async with relay_process(
        tmp_path,
        repo,
        aiohttp_server,
        limits__max_transfers=24,
        limits__max_transfers_per_agent=8,
        limits__min_send_rate="256KB",
        limits__slow_send_window="2s",
    ) as relay:
        rss = await warm(relay)
        request = "GET {} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nRelay-Agent-Id: {}\r\n\r\n"

        async def slow_reader():
            reader, writer = await raw(relay.port, rcvbuf=4096)
            forged = f"forged-{random.getrandbits(64):x}"
            writer.write(request.format(relay.paths["big-1.0.0"], forged).encode())
            got = 0
            with contextlib.suppress(OSError):
                while chunk := await reader.read(1024):
                    got += len(chunk)
                    await asyncio.sleep(1)  # 1 KiB/s
            writer.close()
            return got

        readers = [asyncio.create_task(slow_reader()) for _ in range(40)]
        await asyncio.sleep(1)
        during = await relay.metrics()
        # Forged ids count as their one address: at most the per-agent limit of slots.
        assert during["relay_active_transfers"] <= 8
        await Agent(relay).served("big-1.0.0")
        got = await asyncio.wait_for(asyncio.gather(*readers), 20)
        assert all(n < BIG for n in got)  # every slow reader was cut off
        metrics = await check_bounds(relay, rss)
        assert closed(metrics, "slow_reader") >= 1
        assert metrics["relay_active_transfers"] == 0


async def test_report_reason_flood(tmp_path, repo, aiohttp_server):
    async with relay_process(tmp_path, repo, aiohttp_server) as relay:
        rss = await warm(relay)
        flooder = Agent(relay, "flooder")
        async with aiohttp.ClientSession() as s:
            await flooder.checkin(s)
            for i in range(20):
                events = [
                    {"product": "app", "event": "failed", "reason": f"r{i}-{j}"}
                    for j in range(1000)
                ]
                status, _ = await flooder.request(
                    s, "POST", "/v1/reports", json={"agent_id": "flooder", "events": events}
                )
                assert status == 202
            # Reports for agents that never checked in create nothing.
            for i in range(200):
                async with s.post(
                    f"{relay.base}/v1/reports",
                    json={
                        "agent_id": f"ghost-{i}",
                        "events": [{"product": "a", "event": "failed"}],
                    },
                ) as r:
                    assert r.status == 403
        await Agent(relay).served()
        metrics = await check_bounds(relay, rss)
        assert metrics['relay_agent_events_total{event="failed",reason="other"}'] == 20_000


async def test_checkins_from_many_ids(tmp_path, repo, aiohttp_server):
    async with relay_process(tmp_path, repo, aiohttp_server, limits__max_agents=1000) as relay:
        rss = await warm(relay)
        many = 3000  # benchmarks/idle_bench.py runs the 50,000
        sem = asyncio.Semaphore(32)
        async with aiohttp.ClientSession() as s:

            async def one(i):
                async with (
                    sem,
                    s.post(
                        f"{relay.base}/v1/checkin",
                        json={"agent_id": f"id-{i}", "installed": []},
                    ) as r,
                ):
                    assert r.status in (200, 503)

            attack = asyncio.gather(*(one(i) for i in range(many)))
            await asyncio.sleep(0.5)
            await Agent(relay).served()
            await attack
        metrics = await check_bounds(relay, rss)
        assert metrics["relay_agents"] <= 1000
        assert metrics['relay_agents_evicted_total{reason="cap"}'] >= many - 1000


async def test_delta_requests_for_arbitrary_pairs(tmp_path, repo, aiohttp_server):
    async with relay_process(tmp_path, repo, aiohttp_server) as relay:
        rss = await warm(relay)
        shas = [p.rpartition("/")[2].partition(".")[0] for p in relay.paths.values()]
        shas += [os.urandom(32).hex() for _ in range(10)]
        async with aiohttp.ClientSession() as s:
            for a in shas:
                for b in shas:
                    async with s.get(f"{relay.base}/deltas/{a}/{b}") as r:
                        assert r.status == 404
        await Agent(relay).served()
        await asyncio.sleep(0.5)
        metrics = await check_bounds(relay, rss)
        # No pair was queued: nothing was computed, nothing is on disk.
        assert not any(k.startswith("relay_delta_patches_total") for k in metrics)
        assert not any((relay.data_dir / "deltas").rglob("*.*"))


@pytest.mark.parametrize("workers", [1, 2])
async def test_slow_bodies(tmp_path, repo, aiohttp_server, workers):
    """A request head, then a body that trickles: 408 at ``limits.body_timeout``, then closed.

    With one process, and with a worker that forwards the body to its leader.
    """
    async with relay_process(
        tmp_path, repo, aiohttp_server, limits__body_timeout="2s", relay__workers=workers
    ) as relay:
        rss = await warm(relay)
        answered_after = []
        closed_after = []

        async def attacker(n: int) -> None:
            reader, writer = await raw(relay.port)
            started = time.monotonic()
            path = "/v1/checkin" if n % 2 else "/v1/reports"
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: 1000\r\n\r\n{{".encode()
            )
            first = asyncio.create_task(reader.read(1024))
            with contextlib.suppress(OSError):
                while not first.done() and time.monotonic() - started < 15:
                    writer.write(b" ")  # one byte of the body, now and then
                    await writer.drain()
                    await asyncio.wait([first], timeout=0.5)
            head = await first
            answered_after.append((time.monotonic() - started, head))
            with contextlib.suppress(OSError):
                while await asyncio.wait_for(reader.read(1024), 20):
                    pass
            closed_after.append(time.monotonic() - started)
            writer.close()

        attack = [asyncio.create_task(attacker(n)) for n in range(100)]
        await asyncio.sleep(0.5)
        await Agent(relay).served()  # handlers and connections are not all taken
        await asyncio.wait_for(asyncio.gather(*attack), 40)
        assert len(answered_after) == 100
        # Cut at the deadline (2 s), answered 408; the connections then closed by the relay.
        late = [(took, head[:40]) for took, head in answered_after if took > 6]
        assert not late, late[:3]
        assert all(head.startswith(b"HTTP/1.1 408") for _took, head in answered_after)
        assert all(took < 30 for took in closed_after)
        metrics = await check_bounds(relay, rss)
        assert closed(metrics, "body_timeout") >= 100

"""``relay demo``: a publisher's origin, a relay and N agents on loopback.

It publishes three versions of a generated multi-megabyte binary with small,
realistic changes between them, starts an origin and a relay on free ports, runs N
agents through installing v1, then upgrading to v2 and v3 as they are published,
and prints a summary built from the origin's and the relay's real counters.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

from aiohttp import web

from relay.agent.updater import Agent, AgentConfig
from relay.config import load_config
from relay.core.protocol import DeltaFormat
from relay.errors import ConfigError
from relay.publisher.repository import Repository
from relay.server import make_app
from relay.server.state import STATE, RelayState

PRODUCT = "endpoint-agent"
FILE = "agent-core.bin"
SIZE = 6 * 1024 * 1024


def generate_release(seed: int, base: bytes | None = None) -> bytes:
    """A binary-like file (code-like blocks, tables, strings) or the next release of one.

    A release changes a few functions (small edits), shifts code by inserting a
    little, and bumps embedded version strings: what patch releases look like.
    """
    rng = random.Random(seed)
    if base is None:
        parts: list[bytes] = []
        opcodes = [rng.randbytes(rng.randrange(2, 8)) for _ in range(400)]
        while sum(len(p) for p in parts) < SIZE:
            kind = rng.random()
            if kind < 0.6:  # code: a limited instruction vocabulary
                parts.append(b"".join(rng.choice(opcodes) for _ in range(512)))
            elif kind < 0.8:  # strings
                parts.append(
                    b"\0".join(f"symbol_{rng.randrange(10**6)}_v1.0".encode() for _ in range(64))
                )
            else:  # tables of offsets
                start = rng.randrange(1 << 24)
                parts.append(b"".join((start + 16 * i).to_bytes(4, "little") for i in range(256)))
        return b"".join(parts)[:SIZE]
    data = bytearray(base)
    for _ in range(25):  # edited functions
        at = rng.randrange(len(data) - 300)
        data[at : at + rng.randrange(16, 256)] = rng.randbytes(rng.randrange(16, 256))
    for _ in range(3):  # inserted code
        at = rng.randrange(len(data))
        data[at:at] = rng.randbytes(rng.randrange(200, 2000))
    return bytes(data).replace(b"_v1.0", f"_v1.{seed}".encode()[:5])


class CountingOrigin:
    """A static server for the publisher's ``public/`` tree that counts what it sends."""

    def __init__(self, public: Path) -> None:
        self.public = public.resolve()
        self.bytes_sent = 0
        self.requests: Counter[str] = Counter()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve a file (with single ``bytes=N-`` ranges for resumes)."""
        path = (self.public / request.match_info["tail"]).resolve()
        if not path.is_relative_to(self.public) or not path.is_file():
            raise web.HTTPNotFound
        data = await asyncio.to_thread(path.read_bytes)
        self.requests[request.match_info["tail"].split("/", 1)[0]] += 1
        rng = request.headers.get("Range", "")
        first = rng[6:-1]
        if rng.startswith("bytes=") and rng.endswith("-") and first.isascii() and first.isdigit():
            start = int(first)
            body = data[start:]
            self.bytes_sent += len(body)
            return web.Response(
                status=206,
                body=body,
                headers={"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"},
            )
        self.bytes_sent += len(data)
        return web.Response(body=data)


async def _site(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server  # noqa: SLF001 - the only way to learn the bound port
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return runner, f"http://127.0.0.1:{port}/"


class Progress:
    """A one-line progress bar."""

    def __init__(self, out: TextIO, total: int, label: str) -> None:
        self.out, self.total, self.label, self.done = out, total, label, 0
        self.tty = out.isatty()

    def step(self) -> None:
        """One more done."""
        self.done += 1
        width = 30
        filled = width * self.done // self.total
        line = (
            f"  {self.label:<34} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}"
        )
        if self.tty:
            self.out.write("\r" + line)
            if self.done == self.total:
                self.out.write("\n")
        elif self.done == self.total:
            self.out.write(line + "\n")
        self.out.flush()


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


async def run_demo(agents: int = 20, keep_running: bool = False, out: TextIO = sys.stdout) -> int:
    """Run the demo; return an exit code."""
    workdir = Path(tempfile.mkdtemp(prefix="relay-demo-"))
    started = time.monotonic()
    try:
        out.write(f"relay demo in {workdir}\n")
        repo = Repository.init(workdir / "origin")
        releases = [generate_release(1)]
        releases.append(generate_release(2, releases[0]))
        releases.append(generate_release(3, releases[1]))
        versions = ["1.0.0", "1.0.1", "1.0.2"]
        repo.add_bytes(releases[0], FILE, product=PRODUCT, version=versions[0])
        root_file = workdir / "root.json"
        root_file.write_bytes(repo.root_bytes(1))

        origin = CountingOrigin(repo.public_dir)
        origin_app = web.Application()
        origin_app.router.add_get("/{tail:.+}", origin.handle)
        origin_runner, origin_url = await _site(origin_app)

        config = load_config(
            None,
            environ={},
            overrides={
                "relay.data_dir": str(workdir / "relay"),
                "relay.access_log": False,
                "upstream.urls": [origin_url],
                "upstream.trusted_root": str(root_file),
                "sync.interval": 3600,
                "sync.jitter": 0,
                "store.scrub_interval": 0,
                # The demo approves by setting: every kind installs without approval.
                "policy.install_undefined": {"software": True, "content": True, "config": True},
            },
        )
        relay_app = make_app(config)
        relay_runner, relay_url = await _site(relay_app)
        state: RelayState = relay_app[STATE]
        # Ready: verified metadata, and v1 cached (the relay prefetches on its own too).
        await state.mirror.sync_once()
        await state.mirror.prefetch_now()
        out.write(f"origin {origin_url}  relay {relay_url}  agents {agents}\n")

        fleet = [
            Agent(
                AgentConfig(
                    agent_id=f"agent-{i:03d}",
                    trusted_root=root_file,
                    state_dir=workdir / "agents" / f"{i:03d}" / "state",
                    install_dir=workdir / "agents" / f"{i:03d}" / "install",
                    relays=(relay_url,),
                    origin=origin_url,
                )
            )
            for i in range(agents)
        ]
        failures = 0
        # Agents block in their own threads; the relay's file I/O keeps the default pool.
        agent_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="demo-agent")
        loop = asyncio.get_running_loop()
        for n, version in enumerate(versions):
            if n:
                repo.add_bytes(releases[n], FILE, product=PRODUCT, version=version)
                await state.mirror.sync_once()
                await _wait_for_deltas(state, repo)
            progress = Progress(out, agents, f"{'install' if n == 0 else 'upgrade to'} {version}")

            async def one(agent: Agent, progress: Progress = progress) -> bool:
                summary = await loop.run_in_executor(agent_pool, agent.run_once)
                progress.step()
                return not summary.failed and not summary.error

            results = await asyncio.gather(*(one(a) for a in fleet))
            failures += results.count(False)
        for agent in fleet:
            agent.close()
        agent_pool.shutdown()

        updated = sum(
            1 for a in fleet if a.installed.get(PRODUCT, {}).get("version") == versions[-1]
        )
        served = state.metrics.bytes_served.values
        to_agents = sum(served.values())
        registry = state.metrics.registry
        delta_bytes = sum(
            registry.get_sample_value("relay_delta_bytes_served_total", {"format": str(f)}) or 0.0
            for f in DeltaFormat
        )
        delta_full = sum(
            registry.get_sample_value("relay_delta_full_bytes_replaced_total", {"format": str(f)})
            or 0.0
            for f in DeltaFormat
        )
        cache = served.get(("cache",), 0.0)
        from_fill = served.get(("upstream",), 0.0)
        product_size = len(releases[-1])
        out.write("\nsummary\n")
        out.write(
            f"  agents updated to {versions[-1]}:     {updated}/{agents}"
            f"{f'  ({failures} failed runs)' if failures else ''}\n"
        )
        out.write(
            f"  bytes from the origin:          {_mb(origin.bytes_sent)}"
            f"  ({origin.bytes_sent / product_size:.1f}x the product's size)\n"
        )
        out.write(f"  bytes served to agents:         {_mb(to_agents)}\n")
        out.write(
            f"  served as deltas:               {_mb(delta_bytes)} instead of {_mb(delta_full)}"
            f" of full targets ({100 * delta_bytes / max(delta_full, 1):.2f}%)\n"
        )
        out.write(
            f"  blob bytes from cache:          {_mb(cache)}; while filling: {_mb(from_fill)}\n"
        )
        out.write(f"  time:                           {time.monotonic() - started:.1f} s\n")
        ok = updated == agents and delta_bytes > 0 and origin.bytes_sent < agents * product_size
        if keep_running:
            out.write(f"\norigin {origin_url}\nrelay  {relay_url}\n(Ctrl-C to stop)\n")
            out.flush()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()  # until Ctrl-C
        await relay_runner.cleanup()
        await origin_runner.cleanup()
        return 0 if ok else 1
    finally:
        if not keep_running:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    """Run ``relay demo`` and return its exit code (1 when the summary shows a failure).

    Raises:
        ConfigError: ``--agents`` is below 1.
    """
    if args.agents < 1:
        raise ConfigError("--agents", args.agents, "command line", "--agents must be at least 1")
    return asyncio.run(run_demo(args.agents, args.keep_running))


async def _wait_for_deltas(state: RelayState, repo: Repository) -> None:
    """Wait (bounded) until the relay has patches from older versions to the newest."""
    targets = sorted(repo.targets(), key=lambda t: t.info.semver)
    newest = targets[-1]
    deltas = state.deltas
    assert deltas is not None
    for _ in range(1200):  # bounded: at most a minute
        if all(deltas.lookup(t.sha256, newest.sha256, None) for t in targets[:-1][-3:]):
            return
        await asyncio.sleep(0.05)

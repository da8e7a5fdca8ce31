"""Test support: plain helpers behind the fixtures in ``conftest.py``.

A fault-injecting origin, relay configs, starting relays (in-process or as a real
``relay serve`` process), and a stock TUF client. The origin is a real aiohttp
application serving a publisher's ``public/`` tree over loopback; faults are switched
per path so tests can play a hostile or broken upstream. The TUF client is
python-tuf's own ``ngclient.Updater``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import coverage
from aiohttp import web
from tuf.api.metadata import Metadata
from tuf.ngclient import Updater

from relay.config import Config, load_config
from relay.publisher.repository import Repository
from relay.server import make_app
from relay.server.state import STATE


@dataclass
class Fault:
    """How the origin misbehaves for one path."""

    corrupt: bool = False  # flip one byte in the middle
    extra: bytes = b""  # append bytes past the real end
    break_at: int | None = None  # send this many bytes, then drop the connection (once)
    break_times: int = 1
    pause_at: int | None = None  # send this many bytes, then wait for `resume`
    resume: asyncio.Event | None = None
    paused: asyncio.Event | None = None  # set when the pause begins
    ignore_range: bool = False  # answer 200 to a Range request
    status: int | None = None  # answer this status instead
    rate: int | None = None  # bytes per second
    body: bytes | None = None  # serve these bytes instead of the file


@dataclass
class Origin:
    """A static server for a publisher's ``public/`` directory, with faults."""

    public: Path
    hits: Counter[str] = field(default_factory=Counter)
    ranges: list[tuple[str, str]] = field(default_factory=list)
    faults: dict[str, Fault] = field(default_factory=dict)
    down: bool = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        return app

    def target_hits(self) -> int:
        return sum(n for p, n in self.hits.items() if p.startswith("targets/"))

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["tail"]
        self.hits[path] += 1
        if self.down:
            raise web.HTTPServiceUnavailable
        fault = self.faults.get(path, Fault())
        if fault.status is not None:
            return web.Response(status=fault.status)
        file = (self.public / path).resolve()
        if not file.is_relative_to(self.public.resolve()) or not file.is_file():
            if fault.body is None:
                raise web.HTTPNotFound
        data = fault.body if fault.body is not None else await asyncio.to_thread(file.read_bytes)
        if fault.corrupt and data:
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
        data += fault.extra
        start = 0
        status = 200
        headers: dict[str, str] = {"Content-Type": "application/octet-stream"}
        range_header = request.headers.get("Range")
        if range_header:
            self.ranges.append((path, range_header))
        if range_header and not fault.ignore_range and range_header.startswith("bytes="):
            first = range_header[6:].split("-")[0]
            if first.isdigit():
                start = int(first)
                if start >= len(data):
                    return web.Response(
                        status=416, headers={"Content-Range": f"bytes */{len(data)}"}
                    )
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(data) - start
        await resp.prepare(request)
        offset = start
        chunk = 16 * 1024
        while offset < len(data):
            piece = data[offset : offset + chunk]
            if (
                fault.break_at is not None
                and fault.break_times > 0
                and offset < fault.break_at <= offset + len(piece)
            ):
                await resp.write(piece[: fault.break_at - offset])
                fault.break_times -= 1
                await asyncio.sleep(0.05)
                assert request.transport is not None
                request.transport.abort()
                return resp
            if fault.pause_at is not None and offset < fault.pause_at <= offset + len(piece):
                await resp.write(piece[: fault.pause_at - offset])
                offset = fault.pause_at
                if fault.paused is not None:
                    fault.paused.set()
                if fault.resume is not None:
                    await fault.resume.wait()
                fault.pause_at = None
                continue
            await resp.write(piece)
            offset += len(piece)
            if fault.rate:
                await asyncio.sleep(len(piece) / fault.rate)
        await resp.write_eof()
        return resp


def relay_config(
    tmp_path: Path,
    upstreams: list[str],
    trusted_root: Path,
    *,
    name: str = "relay",
    **overrides: Any,
) -> Config:
    """A relay configuration for tests: data in ``tmp_path/name``, no background jitter."""
    values: dict[str, Any] = {
        "relay.data_dir": str(tmp_path / name),
        "relay.listen": "127.0.0.1:0",
        "relay.access_log": False,
        "relay.workers": 1,
        "upstream.urls": upstreams,
        "upstream.trusted_root": str(trusted_root),
        "upstream.retries": 1,
        "upstream.retry_backoff": 0.01,
        "upstream.read_timeout": 5,
        "sync.interval": 3600,
        "sync.prefetch": "all",
        "sync.jitter": 0,
        "store.scrub_interval": 0,
    }
    values.update(overrides)
    return load_config(None, environ={}, overrides=values)


def released(repo: Repository, data: bytes, name: str, **info: Any) -> Repository:
    """Add one release to ``repo`` and return it (the body of a module's ``repo`` fixture).

    ``info`` takes :meth:`Repository.add_bytes`'s keywords: product, version, kind...
    """
    repo.add_bytes(data, name, **info)
    return repo


def write_root(tmp_path: Path, data: bytes, name: str = "root.json") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


class TufClient:
    """python-tuf's Updater against a base URL, with a persistent metadata directory."""

    def __init__(self, workdir: Path, base_url: str, root: bytes) -> None:
        self.metadata_dir = workdir / "metadata"
        self.download_dir = workdir / "downloads"
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.download_dir.mkdir(parents=True, exist_ok=True)
        self.base_url = base_url.rstrip("/")
        self.root = root

    def _updater(self) -> Updater:
        return Updater(
            metadata_dir=str(self.metadata_dir),
            metadata_base_url=f"{self.base_url}/metadata/",
            target_dir=str(self.download_dir),
            target_base_url=f"{self.base_url}/targets/",
            bootstrap=self.root,
        )

    def refresh_and_download(self) -> dict[str, tuple[bytes, dict[str, Any]]]:
        """Refresh, then download and verify every target: path -> (bytes, custom)."""
        updater = self._updater()
        updater.refresh()
        targets_md = Metadata.from_file(str(self.metadata_dir / "targets.json"))
        out = {}
        for path in targets_md.signed.targets:
            info = updater.get_targetinfo(path)
            assert info is not None, path
            dest = self.download_dir / path.replace("/", "_")
            if dest.exists():
                dest.unlink()
            updater.download_target(info, str(dest))
            out[path] = (dest.read_bytes(), dict(info.custom))
        return out

    def refresh(self) -> None:
        self._updater().refresh()

    async def arefresh_and_download(self) -> dict[str, tuple[bytes, dict[str, Any]]]:
        return await asyncio.to_thread(self.refresh_and_download)

    async def arefresh(self) -> None:
        await asyncio.to_thread(self.refresh)


async def start_relay(aiohttp_server: Any, config: Config) -> Any:
    """Start a relay on loopback and wait for its first verified sync."""
    app = make_app(config)
    server = await aiohttp_server(app)
    state = app[STATE]
    for _ in range(500):
        if state.mirror.current is not None or state.mirror.last_sync_failed_at is not None:
            break
        await asyncio.sleep(0.01)
    return server


def relay_state(server: Any) -> Any:
    return server.app[STATE]


async def settle(server: Any) -> None:
    """Run a sync and the prefetch it triggers, deterministically."""
    state = relay_state(server)
    await state.mirror.sync_once()
    await state.mirror.prefetch_now()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def coverage_env() -> dict[str, str]:
    """``COVERAGE_PROCESS_START`` for a relay child process, when this process is measured.

    coverage.py's own ``.pth`` file (coverage 7.13+) starts measuring a Python process
    that finds this variable, with ``[tool.coverage.run]`` from ``pyproject.toml``
    (``source``, ``parallel``: the child writes its own data file, which pytest-cov
    combines into the report). It is given to relay processes only, not set for the
    whole session: a child started to check what a module imports must not get
    coverage's own imports (multiprocessing) added.
    """
    if coverage.Coverage.current() is None:
        return {}
    return {"COVERAGE_PROCESS_START": str(PYPROJECT)}


@dataclass
class RelayProcess:
    """A ``relay serve`` process: ``url`` is its base URL (ending in ``/``)."""

    proc: asyncio.subprocess.Process
    url: str
    data_dir: Path


async def start_relay_process(
    args: list[str],
    port: int,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    stderr: Any = asyncio.subprocess.PIPE,
) -> asyncio.subprocess.Process:
    """`relay serve` in its own process (prefetch off); wait until /readyz answers 200.

    ``stderr``: where its logs go (a file for a test that reads many lines: nothing
    drains the pipe while it runs).

    When the tests are measured, so is the child (see :func:`coverage_env`); stop it
    with SIGTERM so it exits cleanly and writes its data.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay.cli.main",
        "serve",
        *args,
        "--listen",
        f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=stderr,
        env={
            **os.environ,
            **coverage_env(),
            "RELAY_SYNC__PREFETCH": "none",
            "RELAY_RELAY__WORKERS": "1",
            **(env or {}),
        },
        preexec_fn=preexec_fn,
    )
    async with aiohttp.ClientSession() as s:
        for _ in range(300):
            try:
                async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
                    if r.status == 200:
                        return proc
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    proc.kill()
    _, err = await proc.communicate()
    raise AssertionError(f"relay did not become ready: {(err or b'').decode()[-2000:]}")


def agent_headers(server: Any, agent_id: str) -> dict[str, str]:
    """``Relay-Agent-Id`` and a valid ``Relay-Agent-Token`` for an in-process relay."""
    import time

    from relay.core.tokens import issue_token
    from relay.server.state import AGENT_SECRET

    token = issue_token(server.app[AGENT_SECRET], agent_id, time.time())
    return {"Relay-Agent-Id": agent_id, "Relay-Agent-Token": token}


async def stop_process(proc: asyncio.subprocess.Process, grace: float = 20) -> bool:
    """SIGTERM ``proc`` if it still runs; kill it after ``grace`` s. True if it stopped in time."""
    if proc.returncode is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False
    return True

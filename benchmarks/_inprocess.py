"""A relay in the benchmark's own process (for benchmarks that inject faults into it)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from relay.config import load_config
from relay.server import make_app
from relay.server.state import STATE


async def inprocess_relay(
    work: Path, repo_root: bytes, origin_url: str, **overrides: Any
) -> tuple[web.AppRunner, str, Any]:
    """Start a relay in this process on a free loopback port, after its first verified sync.

    Returns ``(runner, base_url, state)``; data under ``work/relay``, no access log.
    """
    root = work / "root.json"
    root.write_bytes(repo_root)
    values = {
        "relay.data_dir": str(work / "relay"),
        "relay.access_log": False,
        "upstream.urls": [origin_url],
        "upstream.trusted_root": str(root),
        "sync.jitter": 0,
        "store.scrub_interval": 0,
        **overrides,
    }
    app = make_app(load_config(None, environ={}, overrides=values))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    state = app[STATE]
    for _ in range(500):
        if state.mirror.current is not None:
            break
        await asyncio.sleep(0.02)
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}", state

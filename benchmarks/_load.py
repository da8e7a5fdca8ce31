"""Load helpers run in their own processes: a rate-limited origin and many clients.

The clients are Python (aiohttp) rather than wrk because the figures need each
client's own completion time and byte count, a simultaneous start, and a check of
every body's sha256; wrk reports only aggregates.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).parent.parent))

from relay.transfer.bandwidth import BandwidthLimiter  # noqa: E402


def origin(public: Path, port: int, rate: int) -> None:
    """A static origin whose total output is limited to ``rate`` bytes/s (a WAN link)."""
    sent: Counter[str] = Counter()
    limiter = BandwidthLimiter(rate, 0)

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response(dict(sent))

    async def serve(request: web.Request) -> web.StreamResponse:
        path = request.match_info["tail"]
        file = public / path
        if not file.is_file():
            raise web.HTTPNotFound
        data = file.read_bytes()
        start = 0
        resp = web.StreamResponse()
        rng = request.headers.get("Range", "")
        if rng.startswith("bytes=") and rng[6:-1].isdigit() and rng.endswith("-"):
            start = int(rng[6:-1])
            resp.set_status(206)
            resp.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        resp.content_length = len(data) - start
        await resp.prepare(request)
        offset = start
        while offset < len(data):
            chunk = data[offset : offset + 16384]
            await limiter.acquire(None, len(chunk))
            await resp.write(chunk)
            sent[path] += len(chunk)
            offset += len(chunk)
        return resp

    app = web.Application()
    app.router.add_get("/_stats", stats)
    app.router.add_get("/{tail:.+}", serve)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


async def clients(url: str, n: int, sha256: str, timeout: float, agent_prefix: str) -> dict:
    """``n`` clients GET ``url`` at once; report per-client bytes, times and hash checks."""
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    results = []
    async with aiohttp.ClientSession(
        connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as s:
        gate = asyncio.Event()

        async def one(i: int) -> None:
            await gate.wait()
            t0 = time.monotonic()
            h = hashlib.sha256()
            got = 0
            status = 0
            try:
                async with s.get(url, headers={"Relay-Agent-Id": f"{agent_prefix}{i}"}) as r:
                    status = r.status
                    async for chunk in r.content.iter_chunked(65536):
                        h.update(chunk)
                        got += len(chunk)
                ok = status == 200 and h.hexdigest() == sha256
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            results.append({"ok": ok, "bytes": got, "seconds": time.monotonic() - t0})

        tasks = [asyncio.create_task(one(i)) for i in range(n)]
        await asyncio.sleep(0.2)
        start = time.monotonic()
        gate.set()
        await asyncio.gather(*tasks)
        wall = time.monotonic() - start
    done = [r["seconds"] for r in results if r["ok"]]
    return {
        "clients": n,
        "ok": len(done),
        "last_done_s": max(done) if done else None,
        "done_s": sorted(done),
        "wall_s": wall,
        "bytes": [r["bytes"] for r in results],
    }


async def stream_for(url: str, agents: int, seconds: float) -> dict:
    """``agents`` agents download ``url`` over and over for ``seconds``; bytes per agent."""
    per_agent = [0] * agents
    stop = time.monotonic() + seconds
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:

        async def one(i: int) -> None:
            while time.monotonic() < stop:
                try:
                    async with s.get(url, headers={"Relay-Agent-Id": f"agent-{i}"}) as r:
                        async for chunk in r.content.iter_any():
                            if time.monotonic() >= stop:
                                return
                            per_agent[i] += len(chunk)
                except (aiohttp.ClientError, TimeoutError):
                    await asyncio.sleep(0.05)

        warm = asyncio.gather(*(one(i) for i in range(agents)))
        await warm
    return {"per_agent": per_agent, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    o = sub.add_parser("origin")
    o.add_argument("public", type=Path)
    o.add_argument("port", type=int)
    o.add_argument("rate", type=int)
    c = sub.add_parser("clients")
    c.add_argument("url")
    c.add_argument("n", type=int)
    c.add_argument("sha256")
    c.add_argument("--timeout", type=float, default=60)
    c.add_argument("--agent-prefix", default="agent-")
    st = sub.add_parser("stream")
    st.add_argument("url")
    st.add_argument("agents", type=int)
    st.add_argument("seconds", type=float)
    args = p.parse_args()
    if args.cmd == "origin":
        origin(args.public, args.port, args.rate)
    elif args.cmd == "clients":
        print(
            json.dumps(
                asyncio.run(clients(args.url, args.n, args.sha256, args.timeout, args.agent_prefix))
            )
        )
    else:
        print(json.dumps(asyncio.run(stream_for(args.url, args.agents, args.seconds))))


if __name__ == "__main__":
    main()

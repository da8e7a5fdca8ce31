"""Idle connections, relay beside nginx: memory per connection, how many are held.

Both servers get the same cap (10,000 connections: ``limits.max_connections`` and nginx
``worker_connections``), the same open-file limit (this process's), one process or
worker each, and timeouts long enough not to close anything during a run. Each run:

1. memory: open 4,000 raw TCP connections that send nothing, wait, and read the
   server's resident memory (``VmRSS``; nginx: master plus worker) before and after;
   the difference divided by 4,000 is the memory per idle connection;
2. capacity: go on to 14,000 connections (past the cap), wait, and count the sockets
   the server holds (``/proc/<pid>/fd``, less those it held before) and the
   connections it closed (the client reads end-of-file or a reset). Past its cap
   the relay closes the connection that has waited longest; nginx stops accepting
   and leaves the rest in the kernel's accept queue.
3. a legitimate request while the 14,000 are open: its status and latency.

``--checkins N`` instead sends N check-ins with distinct agent ids (50,000 by
default) to a relay and reports its memory growth and a legitimate check-in's
latency during and after.

Run:  python benchmarks/idle_bench.py [--runs 3] [--checkins 50000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

from benchmarks._common import (  # noqa: E402
    WORK,
    free_port,
    machine,
    nginx,
    relay_process,
    save,
    wait_http,
)
from relay.publisher.repository import Repository  # noqa: E402

CAP = 10_000
MEASURED = 4_000
PAST_CAP = 14_000
LONG = "300s"


def rss(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def sockets(pids: list[int]) -> int:
    n = 0
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                if fd.readlink().name.startswith("socket:"):
                    n += 1
            except OSError:
                continue
    return n


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@contextmanager
def nginx_idle(port: int, root: Path) -> Iterator[list[int]]:
    """nginx with the relay's cap and long timeouts, one worker, not a daemon."""
    conf_dir = Path(tempfile.mkdtemp(prefix="nginx-idle-", dir=WORK))
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    conf = conf_dir / "nginx.conf"
    temp = {k: conf_dir / k for k in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
    conf.write_text(f"""
worker_processes 1;
worker_rlimit_nofile {nofile};
pid {conf_dir}/nginx.pid;
error_log {conf_dir}/error.log crit;
daemon off;
events {{ worker_connections {CAP}; }}
http {{
    access_log off;
    client_header_timeout {LONG};
    keepalive_timeout {LONG};
    client_body_temp_path {temp["body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {root};
        location / {{ }}
    }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(conf_dir)])
    wait_http(f"http://127.0.0.1:{port}/", ok=(200, 403, 404))
    try:
        yield [proc.pid, *children(proc.pid)]
    finally:
        proc.send_signal(signal.SIGQUIT)
        proc.wait(30)
        shutil.rmtree(conf_dir, ignore_errors=True)


async def open_idle(port: int, n: int, into: list) -> None:
    for start in range(0, n, 500):
        batch = [
            asyncio.open_connection("127.0.0.1", port, limit=1024)
            for _ in range(min(500, n - start))
        ]
        for result in await asyncio.gather(*batch, return_exceptions=True):
            if not isinstance(result, BaseException):
                into.append(result)
        await asyncio.sleep(0.05)


async def legit(port: int, path: str) -> tuple[int, float]:
    started = time.monotonic()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        status = int(head.split()[1]) if head else 0
    except (OSError, TimeoutError):
        status = 0
    return status, time.monotonic() - started


async def one_run(port: int, pids: list[int], path: str) -> dict:
    await asyncio.sleep(0.5)
    rss0, sock0 = rss(pids), sockets(pids)
    conns: list = []
    await open_idle(port, MEASURED, conns)
    await asyncio.sleep(2)
    rss1 = rss(pids)
    await open_idle(port, PAST_CAP - MEASURED, conns)
    await asyncio.sleep(3)
    held = sockets(pids) - sock0
    closed = sum(1 for reader, _ in conns if reader.at_eof() or reader.exception())
    status, took = await legit(port, path)
    for _, writer in conns:
        writer.close()
    await asyncio.sleep(2)
    return {
        "bytes_per_idle_connection": (rss1 - rss0) / MEASURED,
        "held": held,
        "closed_by_server": closed,
        "opened": len(conns),
        "legit_status": status,
        "legit_seconds": round(took, 3),
    }


def build_repo(path: Path) -> Repository:
    if path.exists():
        shutil.rmtree(path)
    repo = Repository.init(path)
    repo.add_bytes(b"x" * 4096, "small.bin", product="small", version="1.0.0")
    return repo


def summary(runs: list[dict], key: str) -> str:
    values = [r[key] for r in runs]
    fmt = ",.3f" if key.endswith("seconds") else ",.0f"
    return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


async def checkins(port: int, n: int, pid: int) -> dict:
    import aiohttp  # noqa: PLC0415 - only this mode needs a client session

    rss0 = rss([pid])
    url = f"http://127.0.0.1:{port}/v1/checkin"
    sem = asyncio.Semaphore(64)
    worst = 0.0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one(i: int) -> None:
            async with sem, s.post(url, json={"agent_id": f"bench-{i}", "installed": []}) as r:
                await r.read()

        async def probe() -> float:
            started = time.monotonic()
            async with s.post(url, json={"agent_id": "legit", "installed": []}) as r:
                assert r.status == 200, r.status
            return time.monotonic() - started

        task = asyncio.gather(*(one(i) for i in range(n)))
        started = time.monotonic()
        while not task.done():
            worst = max(worst, await probe())
            await asyncio.sleep(0.5)
        await task
        elapsed = time.monotonic() - started
        after = await probe()
    return {
        "checkins": n,
        "seconds": round(elapsed, 1),
        "rss_growth_bytes": rss([pid]) - rss0,
        "legit_worst_seconds": round(worst, 3),
        "legit_after_seconds": round(after, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--checkins", type=int, default=0, help="check-ins mode: how many")
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    repo = build_repo(WORK / "idle-repo")
    root_file = WORK / "idle-root.json"
    root_file.write_bytes(repo.root_bytes(1))
    path = f"/targets/{repo.targets()[0].url_path}"
    origin_port = free_port()
    out: dict = {"machine": machine(), "runs": args.runs}
    env = {
        "RELAY_LIMITS__MAX_CONNECTIONS": str(CAP),
        "RELAY_LIMITS__IDLE_TIMEOUT": LONG,
        "RELAY_LIMITS__HEADER_TIMEOUT": LONG,
        "RELAY_SYNC__PREFETCH": "all",
    }
    with nginx(repo.public_dir, origin_port):
        origin = f"http://127.0.0.1:{origin_port}/"
        if args.checkins:
            port = free_port()
            data = WORK / "idle-relay-checkins"
            shutil.rmtree(data, ignore_errors=True)
            with relay_process(origin, root_file, data, port, env) as proc:
                out["checkins"] = asyncio.run(checkins(port, args.checkins, proc.pid))
            print(json.dumps(out, indent=2))
            save("idle_checkins", out)
            return
        results: dict[str, list[dict]] = {"relay": [], "nginx": []}
        for _ in range(args.runs):
            port = free_port()
            data = WORK / "idle-relay"
            shutil.rmtree(data, ignore_errors=True)
            with relay_process(origin, root_file, data, port, env) as proc:
                wait_http(f"http://127.0.0.1:{port}{path}")
                results["relay"].append(asyncio.run(one_run(port, [proc.pid], path)))
            port = free_port()
            with nginx_idle(port, repo.public_dir) as pids:
                results["nginx"].append(asyncio.run(one_run(port, pids, path)))
    out["results"] = results
    for name, runs in results.items():
        out[f"{name}_summary"] = {
            k: summary(runs, k)
            for k in ("bytes_per_idle_connection", "held", "closed_by_server", "legit_seconds")
        }
    print(json.dumps({k: v for k, v in out.items() if k != "results"}, indent=2))
    print(json.dumps(results, indent=2))
    save("idle", out)


if __name__ == "__main__":
    main()

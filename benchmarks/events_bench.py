"""Events at scale: 10,000 idle GET /v1/events clients on one relay, and a publish through two
relay levels.

Set-up per run: nginx serves a publisher's tree (the static origin); a parent relay polls it
every SYNC_INTERVAL seconds; a child relay holds the parent's events (its own poll is an
hour); CLIENTS light clients (raw asyncio sockets, all in one separate process) hold
``GET /v1/events`` on the child. Measured:

* the child's RSS (VmRSS from /proc) before the clients connect and once every request is
  held (``relay_events_held``): bytes per idle event connection;
* from the publish at the origin: when each client's answer arrives, and when it would
  check in (arrival + ``delay_ms``: the spread over ``events.splay``);
* what the top relay's metadata poll costs the origin: requests and bytes per sync with
  nothing new, through a counting TCP proxy, scaled to a day at the default interval.

RUNS runs; medians with min-max. Writes ``_work/events.json`` and ``events_splay.png``.
Run: ``python benchmarks/events_bench.py`` (needs nginx and the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import HERE, WORK, free_port, machine, nginx, relay_process, save
from relay.config import default_config
from relay.publisher.repository import Repository

CLIENTS = 10_000
RUNS = 3
BATCH = 250  # connections opened at once (the relay's listen backlog is 128 by default)
SYNC_INTERVAL = 1  # seconds: the parent's poll of the origin in the propagation runs
HOLD = 600  # seconds: longer than a run, so no request ends with 204 meanwhile
SPLAY = default_config().events.splay
PROXY_SYNCS = 20  # unchanged syncs counted through the proxy


# -- the client population (a separate process) -------------------------------------


async def _one(host: str, port: int, request: bytes, results: list, opened: list) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request)
    await writer.drain()
    opened.append(1)
    head = await reader.readuntil(b"\r\n\r\n")
    arrived = time.time()
    status = int(head.split(b" ", 2)[1])
    length = re.search(rb"(?i)content-length:\s*(\d+)", head)
    body = await reader.readexactly(int(length.group(1))) if length else b""
    delay = json.loads(body)["delay_ms"] if status == 200 else None
    results.append((arrived, status, delay))
    writer.close()


async def _population(host: str, port: int, count: int, since: str, out: Path) -> None:
    results: list = []
    opened: list = []
    tasks = []
    for i in range(count):
        request = (
            f"GET /v1/events?since={since} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Relay-Agent-Id: bench-{i}\r\n\r\n"
        ).encode()
        tasks.append(asyncio.create_task(_one(host, port, request, results, opened)))
        if len(tasks) % BATCH == 0:
            while len(opened) < len(tasks):
                await asyncio.sleep(0.01)
    while len(opened) < count:
        await asyncio.sleep(0.01)
    print("held", flush=True)
    await asyncio.wait_for(asyncio.gather(*tasks), HOLD)
    out.write_text(json.dumps(results))


# -- a byte-counting TCP proxy (what a sync costs the origin) -----------------------


class CountingProxy:
    """Forwards 127.0.0.1:port to the origin; counts requests and bytes both ways."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.up = self.down = self.requests = 0
        self._ready = threading.Event()
        threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True).start()
        self._ready.wait(10)

    async def _pipe(self, reader, writer, up: bool) -> None:
        while data := await reader.read(65536):
            if up:
                self.up += len(data)
                self.requests += data.count(b"GET ")
            else:
                self.down += len(data)
            writer.write(data)
            await writer.drain()
        writer.close()

    async def _client(self, reader, writer) -> None:
        o_reader, o_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(
            self._pipe(reader, o_writer, True),
            self._pipe(o_reader, writer, False),
            return_exceptions=True,
        )

    async def _serve(self) -> None:
        server = await asyncio.start_server(self._client, "127.0.0.1", self.port)
        self._ready.set()
        async with server:
            await server.serve_forever()


# -- helpers ---------------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    match = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def generation(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/events?since=", timeout=10) as r:
        return json.loads(r.read())["generation"]


def wait_for(condition, what: str, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out: {what}")


def _repo(work: Path) -> Repository:
    repo = Repository.init(work / "repo")
    repo.add_bytes(b"sigs 1\n" * 10_000, "sigs.db", product="sigs", version="1.0.0", kind="content")
    return repo


# -- one run -------------------------------------------------------------------------------


def run_once(index: int) -> dict:
    work = WORK / f"events-{index}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    repo = _repo(work)
    root = work / "root.json"
    root.write_bytes(repo.root_bytes(1))
    origin_port, parent_port, child_port = free_port(), free_port(), free_port()
    hold = {"RELAY_EVENTS__HOLD": str(HOLD)}
    with (
        nginx(repo.public_dir, origin_port),
        relay_process(
            f"http://127.0.0.1:{origin_port}/",
            root,
            work / "parent",
            parent_port,
            env={**hold, "RELAY_SYNC__INTERVAL": str(SYNC_INTERVAL), "RELAY_SYNC__JITTER": "0"},
        ),
        relay_process(
            f"http://127.0.0.1:{parent_port}/",
            root,
            work / "child",
            child_port,
            env={**hold, "RELAY_SYNC__INTERVAL": "3600"},
        ) as child,
    ):
        since = generation(child_port)
        for _ in range(50):  # warm the event path before the baseline
            generation(child_port)
        time.sleep(1)
        before = rss_kib(child.pid)
        out = work / "clients.json"
        clients = subprocess.Popen(
            [sys.executable, __file__, "--clients", str(child_port), str(CLIENTS), since, str(out)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert clients.stdout is not None
        assert clients.stdout.readline().strip() == "held"
        wait_for(lambda: metric(child_port, "relay_events_held") >= CLIENTS, "every request held")
        time.sleep(1)
        after = rss_kib(child.pid)
        published = time.time()
        repo.add_bytes(
            b"sigs 2\n" * 10_000, "sigs.db", product="sigs", version="1.1.0", kind="content"
        )
        clients.wait(HOLD)
        results = json.loads(out.read_text())
    arrivals = sorted(r[0] - published for r in results)
    checkins = sorted(r[0] - published + r[2] / 1000 for r in results if r[1] == 200)
    return {
        "clients": CLIENTS,
        "answered_200": sum(1 for r in results if r[1] == 200),
        "rss_before_kib": before,
        "rss_after_kib": after,
        "kib_per_connection": (after - before) / CLIENTS,
        "first_notification_s": arrivals[0],
        "last_notification_s": arrivals[-1],
        "last_checkin_s": checkins[-1],
        "delays_ms": sorted(r[2] for r in results if r[1] == 200),
        "arrivals_s": arrivals,
    }


def sync_cost() -> dict:
    """Requests and bytes one unchanged sync costs the origin, through a counting proxy."""
    work = WORK / "events-sync"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    repo = _repo(work)
    root = work / "root.json"
    root.write_bytes(repo.root_bytes(1))
    origin_port, relay_port = free_port(), free_port()
    with nginx(repo.public_dir, origin_port):
        proxy = CountingProxy(origin_port)
        with relay_process(
            f"http://127.0.0.1:{proxy.port}/",
            root,
            work / "relay",
            relay_port,
            env={"RELAY_SYNC__INTERVAL": "0.2", "RELAY_SYNC__JITTER": "0"},
        ):
            wait_for(lambda: metric(relay_port, 'relay_sync_runs_total{result="unchanged"}') >= 2,
                     "first unchanged syncs")  # fmt: skip
            runs0 = metric(relay_port, 'relay_sync_runs_total{result="unchanged"}')
            requests0, up0, down0 = proxy.requests, proxy.up, proxy.down
            wait_for(
                lambda: (
                    metric(relay_port, 'relay_sync_runs_total{result="unchanged"}')
                    >= runs0 + PROXY_SYNCS
                ),
                "unchanged syncs",
            )
            runs = metric(relay_port, 'relay_sync_runs_total{result="unchanged"}') - runs0
            requests, up, down = (
                proxy.requests - requests0,
                proxy.up - up0,
                proxy.down - down0,
            )
    sync = default_config().sync
    per_day = 86400 / (sync.interval + sync.jitter / 2)
    return {
        "syncs": runs,
        "requests_per_sync": requests / runs,
        "bytes_per_sync": (up + down) / runs,
        "default_interval_s": sync.interval,
        "default_jitter_s": sync.jitter,
        "syncs_per_day": per_day,
        "requests_per_day": per_day * requests / runs,
        "bytes_per_day": per_day * (up + down) / runs,
    }


def plot(run: dict, path: Path) -> None:
    import matplotlib as mpl  # noqa: PLC0415 - the bench extra, only here

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), constrained_layout=True)
    top.hist(run["arrivals_s"], bins=50, color="tab:blue")
    top.set_title(f"{run['clients']:,} held GET /v1/events: answer arrival after the publish")
    top.set_xlabel("seconds after the publish at the origin (two relay levels)")
    top.set_ylabel("clients")
    bottom.hist([d / 1000 for d in run["delays_ms"]], bins=60, color="tab:green")
    bottom.set_title(f"delay_ms given to each client (events.splay = {SPLAY:.0f} s)")
    bottom.set_xlabel("seconds after its answer the client checks in")
    bottom.set_ylabel("clients")
    fig.savefig(path, dpi=100)


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = CLIENTS * 2 + 1000
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(want, hard)), hard))
    runs = [run_once(i) for i in range(RUNS)]
    cost = sync_cost()
    median_run = sorted(runs, key=lambda r: r["last_notification_s"])[RUNS // 2]
    plot(median_run, HERE / "events_splay.png")
    summary = {
        "machine": machine(),
        "runs": [
            {k: v for k, v in r.items() if k not in ("delays_ms", "arrivals_s")} for r in runs
        ],
        "sync_cost": cost,
    }
    save("events", summary)
    print(json.dumps(summary, indent=2))
    print()
    print(f"KiB per idle connection: {_spread([r['kib_per_connection'] for r in runs])}")
    print(f"first answer after publish (s): {_spread([r['first_notification_s'] for r in runs])}")
    print(f"last answer after publish (s): {_spread([r['last_notification_s'] for r in runs])}")
    print(f"last check-in after publish (s): {_spread([r['last_checkin_s'] for r in runs])}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", nargs=4, metavar=("PORT", "COUNT", "SINCE", "OUT"))
    args = parser.parse_args()
    if args.clients:
        port, count, since, out = args.clients
        asyncio.run(_population("127.0.0.1", int(port), int(count), since, Path(out)))
    else:
        main()

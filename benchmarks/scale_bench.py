"""A relay holding 50,000 registered agents: event-loop stalls, check-in latency, memory, restart.

The relay runs in this process, with a ticker task in its event loop (every 5 ms; a
stall is how late a tick wakes); every client runs in its own process (this script's
``--worker`` modes, aiohttp), so client work never shows as a stall. nginx is the
origin. Each run, on a fresh repository and data directory:

1. **populate**: AGENTS check-ins with distinct ``agent_id`` (``Relay-Agent-Id``),
   CONCURRENCY at once (two client processes), each agent reporting the first version
   installed: the check-in latency percentiles (p50/p90/p99/max, client side) and the
   relay's RSS growth per registered agent;
2. **sync**: a new version is published (in a client process, not timed), then the
   relay's ``Mirror.sync_once`` runs and its prefetch fills the new blob into a store
   whose quota (``store.max_bytes``) holds three blobs, so each fill evicts (repeated
   SYNCS times);
3. **fill**: agents download the evicted older versions, two at once: fills that evict;
4. **scrub**: one ``Mirror.scrub_once`` pass (every stored blob hashed again);
5. **metrics**: SCRAPES ``GET /metrics`` (agents by state and by version);
6. **listing**: ``GET /v1/admin/agents`` walked page by page
   (``?limit=PAGE&after=<id>``, while the answer has ``next``), or taken whole when the
   relay answers the whole list (the report says which ran);
7. **check-in**: the AGENTS registered agents check in again, CONCURRENCY at once;
8. **restart**: the relay is stopped and started again as ``relay serve`` (its own
   process) on the same data directory; restart-to-ready is the time from the process
   start to the first ``200`` of ``/readyz``, beside the same start on an empty data
   directory (the anchor, in the same run), and the RSS of both once ready.

A quiet second (**idle**) comes first: the ticker's own lateness on this machine. Each
phase reports its worst stall, how many ticks were later than 50 ms, its full (generation
2) garbage collections and the longest of them (``gc.callbacks``), the objects the
collector tracks once it ends (what a full collection walks; frozen ones aside), the relay
process's CPU time (every thread; per check-in in the two check-in phases), and where the
loop's thread was while the loop was late past 50 ms (a thread samples its stack every
10 ms).
Phases 1-7 run in a fresh process per run (memory and collector start from nothing), on
the event loop the relay's configuration names (``relay.event_loop``; asyncio in
checkouts from before that setting).
Deltas are off (``benchmarks/delta_bench.py`` measures the engine). Medians and min–max
over ``--runs``; the load average at the start and end of each run. Every run's figures,
latencies and late ticks are saved (``--json``); ``--plot`` draws the first run's
check-in latency CDFs and stall timeline.

Run:  python benchmarks/scale_bench.py [--runs 3] [--agents 50000] [--concurrency 64]
      [--blob-kib 8192] [--json benchmarks/_work/scale.json] [--append] [--plot scale.png]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (  # noqa: E402
    WORK,
    free_port,
    loadavg,
    machine,
    nginx,
    relay_process,
    spread,
    summary,
)
from benchmarks._inprocess import inprocess_relay  # noqa: E402
from relay.config import load_config  # noqa: E402
from relay.publisher.repository import Repository  # noqa: E402

AGENTS = 50_000
CONCURRENCY = 64
CLIENT_PROCESSES = 2
BLOB = 8 * 2**20  # bytes per version
QUOTA_BLOBS = 3  # store.max_bytes holds this many versions
FIRST_VERSIONS = 4
SYNCS = 3
SCRAPES = 5
PAGE = 1000
TICK = 0.005
SAMPLE = 0.01
STALL = 0.050  # the target: no tick later than this
TOKEN = "scale-bench-admin-token"  # noqa: S105 - a throwaway token for a loopback relay
PRODUCT = "app"
PHASES = ("idle", "populate", "sync", "fill", "scrub", "metrics", "listing", "checkin")


# -- client processes -----------------------------------------------------------------


def agent_id(i: int) -> str:
    return f"agent-{i:06d}"


async def checkin_worker(
    url: str, first: int, count: int, concurrency: int, installed: list[dict[str, str]]
) -> dict[str, Any]:
    """Check in agents ``first``..``first+count-1``, ``concurrency`` at once."""
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    queue = iter(range(first, first + count))
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:

        async def one_client() -> None:
            for i in queue:
                body = {"agent_id": agent_id(i), "installed": installed}
                started = time.perf_counter()
                try:
                    async with s.post(url, json=body, headers={"Relay-Agent-Id": agent_id(i)}) as r:
                        await r.read()
                        status = str(r.status)
                except (aiohttp.ClientError, TimeoutError) as e:
                    status = type(e).__name__
                latencies.append(time.perf_counter() - started)
                statuses[status] = statuses.get(status, 0) + 1

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return {"latencies": latencies, "statuses": statuses}


async def get_worker(urls: list[str], concurrency: int, token: str) -> dict[str, Any]:
    """GET each URL (``concurrency`` at once): status, bytes and seconds of each."""
    results: list[dict[str, Any]] = []
    queue = iter(enumerate(urls))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:

        async def one_client() -> None:
            for n, url in queue:
                started = time.perf_counter()
                async with s.get(
                    url, headers={**headers, "Relay-Agent-Id": f"downloader-{n}"}
                ) as r:
                    size = len(await r.read())
                results.append(
                    {"status": r.status, "bytes": size, "seconds": time.perf_counter() - started}
                )

        await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return {"results": results}


async def listing_worker(base: str, page: int) -> dict[str, Any]:
    """Walk ``GET /v1/admin/agents`` by pages while the answer has ``next``."""
    started = time.perf_counter()
    agents = pages = size = 0
    worst = 0.0
    after: str | None = None
    mode = "single answer (no pages)"
    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=aiohttp.ClientTimeout(total=600),
    ) as s:
        while True:
            params = {"limit": str(page)} | ({"after": after} if after else {})
            t0 = time.perf_counter()
            async with s.get(f"{base}/v1/admin/agents", params=params) as r:
                r.raise_for_status()
                raw = await r.read()
            worst = max(worst, time.perf_counter() - t0)
            body = json.loads(raw)
            pages += 1
            size += len(raw)
            agents += len(body["agents"])
            if "next" not in body:
                break
            mode = f"pages of {page} (limit/after/next)"
            after = body["next"]
            if after is None:
                break
    return {
        "mode": mode,
        "agents": agents,
        "pages": pages,
        "bytes": size,
        "seconds": time.perf_counter() - started,
        "worst_page_seconds": worst,
    }


def publish_worker(repo_dir: str, version: str, seed: int, size: int) -> dict[str, Any]:
    """Publish one version of PRODUCT (``size`` random bytes)."""
    repo = Repository.open(Path(repo_dir))
    data = random.Random(seed).randbytes(size)
    target = repo.add_bytes(data, "app.bin", product=PRODUCT, version=version, kind="content")
    return {"version": version, "url_path": target.url_path, "sha256": target.sha256}


def relay_loop() -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The event loop a relay of this checkout runs on by default (``relay.event_loop``)."""
    try:
        from relay.server.run import loop_factory  # noqa: PLC0415 - absent from older trees
    except ImportError:
        return "asyncio", asyncio.new_event_loop
    name = str(getattr(load_config(None, environ={}).relay, "event_loop", "asyncio"))
    return name, loop_factory(name)  # type: ignore[arg-type]


def worker(argv: list[str]) -> None:
    """``--worker MODE JSON-ARGS``: run one client job and print its JSON result."""
    mode, raw = argv
    args = json.loads(raw)
    if mode == "checkin":
        out = asyncio.run(checkin_worker(**args))
    elif mode == "get":
        out = asyncio.run(get_worker(**args))
    elif mode == "listing":
        out = asyncio.run(listing_worker(**args))
    elif mode == "relay":
        name, factory = relay_loop()
        with asyncio.Runner(loop_factory=factory) as runner:
            out = runner.run(
                measured_relay(
                    work=Path(args.pop("work")),
                    repo=Repository.open(Path(args.pop("repo"))),
                    **args,
                )
            )
        out["event_loop"] = name
    else:
        out = publish_worker(**args)
    print(json.dumps(out))


async def run_worker(mode: str, **args: Any) -> dict[str, Any]:
    """One ``--worker`` process, awaited without blocking the relay's loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--worker",
        mode,
        json.dumps(args),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode:
        msg = f"worker {mode} failed ({proc.returncode})"
        raise RuntimeError(msg)
    return json.loads(out)


async def checkins(
    url: str, agents: int, concurrency: int, installed: list[dict[str, str]]
) -> dict[str, Any]:
    """``agents`` check-ins from CLIENT_PROCESSES processes, ``concurrency`` at once in all."""
    per = -(-agents // CLIENT_PROCESSES)
    jobs = [
        run_worker(
            "checkin",
            url=url,
            first=p * per,
            count=min(per, agents - p * per),
            concurrency=concurrency // CLIENT_PROCESSES,
            installed=installed,
        )
        for p in range(CLIENT_PROCESSES)
    ]
    started = time.perf_counter()
    outs = await asyncio.gather(*jobs)
    took = time.perf_counter() - started
    latencies = sorted(x for o in outs for x in o["latencies"])
    statuses: dict[str, int] = {}
    for o in outs:
        for k, v in o["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return {
        "seconds": took,
        "per_second": len(latencies) / took,
        "statuses": statuses,
        **percentiles(latencies),
        "latencies_ms": [round(x * 1000, 2) for x in latencies],
    }


def percentiles(ordered: list[float]) -> dict[str, float]:
    """p50, p90, p99 and max in milliseconds of sorted seconds."""
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "p50_ms": q[49] * 1000,
        "p90_ms": q[89] * 1000,
        "p99_ms": q[98] * 1000,
        "max_ms": ordered[-1] * 1000,
    }


# -- the relay's loop -----------------------------------------------------------------


@dataclass
class Phase:
    name: str
    ticks: int = 0
    worst: float = 0.0
    over: int = 0  # ticks later than STALL
    seconds: float = 0.0
    gc_full: int = 0  # full (generation 2) garbage collections
    gc_worst: float = 0.0  # the longest of them
    tracked: int = 0  # objects the cyclic collector tracks at the end (frozen ones aside)
    cpu: float = 0.0  # CPU seconds of the relay's process (every thread) during the phase
    tracked_types: dict[str, int] = field(default_factory=dict)  # the most numerous of them


def where(frame: FrameType) -> str:
    """Where a thread is: its innermost function, then the innermost three of the relay's."""
    inner = f"{Path(frame.f_code.co_filename).name}:{frame.f_code.co_name}"
    ours: list[str] = []
    f: FrameType | None = frame
    while f is not None and len(ours) < 3:
        file = f.f_code.co_filename
        if "/relay/" in file and "site-packages" not in file:
            ours.append(f"{file[file.rindex('/relay/') + 1 :]}:{f.f_code.co_name}")
        f = f.f_back
    if ours and ours[0].endswith(inner):
        return " < ".join(ours)
    return " < ".join([inner, *ours])


@dataclass
class Ticker:
    """A task in the relay's loop waking every TICK; a late wake is a stall.

    A thread looks every SAMPLE seconds: while the loop is late past STALL, it
    records where the loop's thread is (:func:`where`), so each stall is named.
    A garbage collection holds the interpreter, so it is timed by ``gc.callbacks``.
    """

    phase: Phase | None = None
    phases: list[Phase] = field(default_factory=list)
    timeline: list[tuple[float, float, str]] = field(default_factory=list)  # (t, late, phase)
    started: float = 0.0
    last_tick: float = 0.0  # perf_counter() of the newest tick
    samples: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> where -> n
    _gc_started: float = 0.0

    def watch(self, stop: threading.Event) -> None:
        """The sampling thread (until ``stop`` is set)."""
        loop_thread = threading.main_thread().ident
        while not stop.wait(SAMPLE):
            phase = self.phase
            if phase is None or time.perf_counter() - self.last_tick < STALL + TICK:
                continue
            frame = sys._current_frames().get(loop_thread)
            if frame is not None:
                found = self.samples.setdefault(phase.name, {})
                key = where(frame)
                found[key] = found.get(key, 0) + 1

    def on_gc(self, event: str, info: dict[str, int]) -> None:
        """``gc.callbacks``: time the full collections (they pause the loop)."""
        if info["generation"] != 2:
            return
        if event == "start":
            self._gc_started = time.perf_counter()
        elif self.phase is not None:
            self.phase.gc_full += 1
            self.phase.gc_worst = max(self.phase.gc_worst, time.perf_counter() - self._gc_started)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.started = last = loop.time()
        while True:
            self.last_tick = time.perf_counter()
            await asyncio.sleep(TICK)
            now = loop.time()
            late = max(0.0, now - last - TICK)
            last = now
            if self.phase is not None:
                p = self.phase
                p.ticks += 1
                p.worst = max(p.worst, late)
                p.over += late > STALL
                if late > 0.001:
                    self.timeline.append((now - self.started, late, p.name))

    @contextlib.asynccontextmanager
    async def measure(self, name: str) -> AsyncIterator[Phase]:
        """The ticks between entering and leaving are counted to phase ``name``."""
        await asyncio.sleep(0.3)  # what came before settles outside the phase
        phase = Phase(name)
        self.phases.append(phase)
        self.phase = phase
        started, cpu = time.perf_counter(), time.process_time()
        try:
            yield phase
        finally:
            phase.seconds = time.perf_counter() - started
            phase.cpu = time.process_time() - cpu
            self.phase = None
            # What a full collection walks (outside the phase: counting them holds the loop).
            tracked = gc.get_objects()
            phase.tracked = len(tracked)
            phase.tracked_types = dict(Counter(type(o).__name__ for o in tracked).most_common(6))
            del tracked


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def process_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            msg = f"{what}: not done after {timeout:.0f} s"
            raise TimeoutError(msg)
        await asyncio.sleep(0.05)


async def measured_relay(
    work: Path, repo: Repository, origin: str, agents: int, concurrency: int, blob: int
) -> dict[str, Any]:
    """Phases 1-7 against a relay in this loop; the data directory is left for the restart."""
    first = [
        await run_worker("publish", repo_dir=str(repo.path), version=f"1.0.{n}", seed=n, size=blob)
        for n in range(FIRST_VERSIONS)
    ]
    runner, base, state = await inprocess_relay(
        work,
        repo.root_bytes(1),
        origin,
        **{
            "sync.interval": 86400,
            "sync.prefetch": "policy",
            "store.max_bytes": quota(blob),
            "store.keep_versions": 1,
            "delta.enabled": False,
            "admin.token": TOKEN,
            "limits.max_agents": max(agents, 1) * 2,
        },
    )
    store = state.mirror.store
    ticker = Ticker()
    tick_task = asyncio.create_task(ticker.run())
    gc.callbacks.append(ticker.on_gc)
    stop = threading.Event()
    sampler = threading.Thread(target=ticker.watch, args=(stop,), daemon=True)
    sampler.start()
    out: dict[str, Any] = {}
    try:
        await wait_until(
            lambda: store.contains(first[-1]["sha256"]), 120, "the first prefetch (origin?)"
        )
        async with ticker.measure("idle"):
            await asyncio.sleep(1)

        installed = [{"product": PRODUCT, "version": "1.0.0", "sha256": first[0]["sha256"]}]
        rss0 = rss()
        async with ticker.measure("populate"):
            out["populate"] = await checkins(f"{base}/v1/checkin", agents, concurrency, installed)
        out["registered"] = len(state.registry)
        out["rss_per_agent"] = (rss() - rss0) / max(agents, 1)

        latest = first
        for n in range(FIRST_VERSIONS, FIRST_VERSIONS + SYNCS):
            new = await run_worker(
                "publish", repo_dir=str(repo.path), version=f"1.0.{n}", seed=n, size=blob
            )
            latest = [*latest, new]
            async with ticker.measure("sync"):
                await state.mirror.sync_once()
                await wait_until(
                    lambda sha=new["sha256"]: store.contains(sha), 120, "the prefetch after a sync"
                )
        evictions_before = store.stats.evictions

        evicted = [f"{base}/targets/{t['url_path']}" for t in latest[:-QUOTA_BLOBS]]
        async with ticker.measure("fill"):
            fills = await run_worker("get", urls=evicted, concurrency=2, token="")
        out["fills"] = {
            "blobs": len(evicted),
            "ok": sum(r["status"] == 200 and r["bytes"] == blob for r in fills["results"]),
            "evictions": store.stats.evictions,
            "evictions_by_fills": store.stats.evictions - evictions_before,
        }

        async with ticker.measure("scrub"):
            scrubbed = await state.mirror.scrub_once()
        out["scrubbed"] = {str(k): v for k, v in scrubbed.items()}

        async with ticker.measure("metrics"):
            scrapes = await run_worker(
                "get", urls=[f"{base}/metrics"] * SCRAPES, concurrency=1, token=""
            )
        out["metrics"] = {
            "worst_seconds": max(r["seconds"] for r in scrapes["results"]),
            "bytes": scrapes["results"][0]["bytes"],
            "statuses": sorted({r["status"] for r in scrapes["results"]}),
        }

        async with ticker.measure("listing"):
            out["listing"] = await run_worker("listing", base=base, page=PAGE)

        async with ticker.measure("checkin"):
            out["checkin"] = await checkins(f"{base}/v1/checkin", agents, concurrency, installed)
    finally:
        stop.set()
        sampler.join()
        gc.callbacks.remove(ticker.on_gc)
        tick_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tick_task
        await runner.cleanup()
    out["stalls"] = {
        p.name: {
            "worst_ms": p.worst * 1000,
            "over_50ms": p.over,
            "seconds": p.seconds,
            "gc_full": p.gc_full,
            "gc_worst_ms": p.gc_worst * 1000,
            "tracked": p.tracked,
            "cpu_s": p.cpu,
            "tracked_types": p.tracked_types,
        }
        for p in merge_phases(ticker.phases)
    }
    out["timeline"] = ticker.timeline
    out["stalled_in"] = ticker.samples
    out["rss_bytes"] = rss()
    return out


def merge_phases(phases: list[Phase]) -> list[Phase]:
    """Phases of one name (the SYNCS syncs) as one."""
    merged: dict[str, Phase] = {}
    for p in phases:
        m = merged.setdefault(p.name, Phase(p.name))
        m.ticks += p.ticks
        m.worst = max(m.worst, p.worst)
        m.over += p.over
        m.seconds += p.seconds
        m.gc_full += p.gc_full
        m.gc_worst = max(m.gc_worst, p.gc_worst)
        m.tracked, m.tracked_types = p.tracked, p.tracked_types  # the last one's
        m.cpu += p.cpu
    return list(merged.values())


def quota(blob: int) -> int:
    """``store.max_bytes``: QUOTA_BLOBS versions and a half."""
    return QUOTA_BLOBS * blob + blob // 2


def start_process(
    data_dir: Path, root_file: Path, origin: str, agents: int, blob: int
) -> dict[str, Any]:
    """Start ``relay serve`` on ``data_dir``: seconds from the process start to ready, its RSS."""
    port = free_port()
    env = {
        "RELAY_SYNC__PREFETCH": "policy",
        "RELAY_STORE__MAX_BYTES": str(quota(blob)),
        "RELAY_STORE__KEEP_VERSIONS": "1",
        "RELAY_DELTA__ENABLED": "false",
        "RELAY_LIMITS__MAX_AGENTS": str(max(agents, 1) * 2),
        "RELAY_ADMIN__TOKEN": TOKEN,
    }
    started = time.perf_counter()
    with relay_process(origin, root_file, data_dir, port, env) as proc:
        ready = time.perf_counter() - started
        resident = process_rss(proc.pid)
    return {"ready_seconds": ready, "rss_bytes": resident}


def one_run(work: Path, agents: int, concurrency: int, blob: int) -> dict[str, Any]:
    load_start = loadavg()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    repo = Repository.init(work / "repo")
    port = free_port()
    with nginx(repo.public_dir, port):
        origin = f"http://127.0.0.1:{port}/"
        # A fresh process per run: its memory and garbage collector start from nothing.
        relay_args = {
            "work": str(work),
            "repo": str(repo.path),
            "origin": origin,
            "agents": agents,
            "concurrency": concurrency,
            "blob": blob,
        }
        out = json.loads(
            subprocess.run(
                [sys.executable, __file__, "--worker", "relay", json.dumps(relay_args)],
                stdout=subprocess.PIPE,
                check=True,
            ).stdout
        )
        root = work / "root.json"
        # The anchor: the same relay started on an empty data directory, in this run.
        out["empty_start"] = start_process(work / "empty", root, origin, agents, blob)
        out["restart"] = start_process(work / "relay", root, origin, agents, blob)
    shutil.rmtree(work, ignore_errors=True)
    return {"load_start": load_start, "load_end": loadavg(), **out}


# -- summary --------------------------------------------------------------------------

LATENCY = ("p50_ms", "p90_ms", "p99_ms", "max_ms", "per_second")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def over(get: Callable[[dict[str, Any]], float]) -> dict[str, float]:
        return summary([get(r) for r in runs])

    return {
        "stalls": {
            name: {
                k: over(lambda r, n=name, k=k: r["stalls"][n].get(k, 0))  # tracked: newer
                for k in ("worst_ms", "over_50ms", "seconds", "gc_full", "gc_worst_ms", "tracked")
            }
            for name in PHASES
        },
        **{
            kind: {k: over(lambda r, kind=kind, k=k: r[kind][k]) for k in LATENCY}
            for kind in ("populate", "checkin")
        },
        **{
            f"{kind}_cpu_us": over(
                lambda r, kind=kind: (
                    r["stalls"][kind].get("cpu_s", math.nan) * 1e6 / r["registered"]
                )
            )
            for kind in ("populate", "checkin")
        },
        "rss_per_agent": over(lambda r: r["rss_per_agent"]),
        "metrics_worst_seconds": over(lambda r: r["metrics"]["worst_seconds"]),
        "listing_seconds": over(lambda r: r["listing"]["seconds"]),
        "listing_worst_page_seconds": over(lambda r: r["listing"]["worst_page_seconds"]),
        "listing_mode": sorted({r["listing"]["mode"] for r in runs}),
        "stalled_in": stalled_in(runs),
        "restart_ready_seconds": over(lambda r: r["restart"]["ready_seconds"]),
        "restart_rss_mib": over(lambda r: r["restart"]["rss_bytes"] / 2**20),
        "empty_ready_seconds": over(lambda r: r["empty_start"]["ready_seconds"]),
        "empty_rss_mib": over(lambda r: r["empty_start"]["rss_bytes"] / 2**20),
        "restart_rss_per_agent": over(
            lambda r: (
                (r["restart"]["rss_bytes"] - r["empty_start"]["rss_bytes"])
                / max(r["registered"], 1)
            )
        ),
    }


def stalled_in(runs: list[dict[str, Any]], top: int = 3) -> dict[str, list[tuple[str, float]]]:
    """Per phase, where the loop's thread was while it stalled: ms per run, most first."""
    out = {}
    for name in PHASES:
        total: dict[str, int] = {}
        for r in runs:
            for key, n in r["stalled_in"].get(name, {}).items():
                total[key] = total.get(key, 0) + n
        ranked = sorted(total.items(), key=lambda kv: -kv[1])[:top]
        out[name] = [(key, n * SAMPLE * 1000 / len(runs)) for key, n in ranked]
    return out


def report(results: dict[str, Any]) -> None:
    s = results["summary"]
    print(f"machine: {results['machine']}")
    print(f"command: {results['command']}")
    for i, run in enumerate(results["runs"], 1):
        print(
            f"run {i} (relay@{run.get('commit', '?')} on {run.get('event_loop', 'asyncio')}): load average {run['load_start']} at start, {run['load_end']} at end; "
            f"{run['registered']} agents registered; check-ins "
            f"{run['populate']['statuses']} then {run['checkin']['statuses']}; "
            f"fills {run['fills']}; listing {run['listing']['mode']}, "
            f"{run['listing']['agents']} agents in {run['listing']['pages']} answers"
        )
    print(f"median (min–max) over {len(results['runs'])} runs")
    print(
        f"{'phase':<10}{'worst stall ms':>24}{'ticks > 50 ms':>16}{'seconds':>20}"
        f"{'full GCs':>14}{'longest GC ms':>24}{'tracked after':>22}"
    )
    for name, st in s["stalls"].items():
        print(
            f"{name:<10}{spread(st['worst_ms'], '.1f'):>24}{spread(st['over_50ms'], '.0f'):>16}"
            f"{spread(st['seconds'], '.1f'):>20}{spread(st['gc_full'], '.0f'):>14}"
            f"{spread(st['gc_worst_ms'], '.1f'):>24}{spread(st['tracked'], '.0f'):>22}"
        )
    print("where the loop's thread was during stalls past 50 ms (sampled; ms per run):")
    for name, found in s["stalled_in"].items():
        for key, ms in found:
            print(f"  {name:<9}{ms:>8.0f} ms  {key}")
    for kind, label in (("populate", "new agents"), ("checkin", "registered agents")):
        c = s[kind]
        print(
            f"check-in, {label}, {results['concurrency']} at once: "
            + ", ".join(f"{k.removesuffix('_ms')} {spread(c[k], '.1f')} ms" for k in LATENCY[:4])
            + f"; {spread(c['per_second'], '.0f')} per s; relay CPU "
            + f"{spread(s[f'{kind}_cpu_us'], '.0f')} µs per check-in"
        )
    print(f"RSS per registered agent: {spread(s['rss_per_agent'], '.0f')} B")
    print(f"/metrics, slowest of {SCRAPES} scrapes: {spread(s['metrics_worst_seconds'], '.3f')} s")
    print(
        f"admin listing ({', '.join(s['listing_mode'])}): {spread(s['listing_seconds'], '.2f')} s, "
        f"slowest answer {spread(s['listing_worst_page_seconds'], '.3f')} s"
    )
    print(
        f"restart to ready: {spread(s['restart_ready_seconds'], '.2f')} s, "
        f"then RSS {spread(s['restart_rss_mib'], '.0f')} MiB "
        f"({spread(s['restart_rss_per_agent'], '.0f')} B per agent over the empty start); "
        f"empty data directory: {spread(s['empty_ready_seconds'], '.2f')} s, "
        f"{spread(s['empty_rss_mib'], '.0f')} MiB"
    )


def plot(results: dict[str, Any], path: Path) -> None:
    """Check-in latency CDFs (populate, registered) of the first run, and its stall timeline."""
    import matplotlib as mpl  # noqa: PLC0415 - only --plot needs it

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    run = results["runs"][0]
    fig, (cdf, line) = plt.subplots(1, 2, figsize=(12, 4.5))
    for kind, label in (("populate", "new agents"), ("checkin", "registered agents")):
        ms = run[kind]["latencies_ms"]
        cdf.plot(ms, [(i + 1) / len(ms) for i in range(len(ms))], label=label)
    cdf.axvline(100, color="grey", linestyle=":", label="p99 target 100 ms")
    cdf.set_xscale("log")
    cdf.set_xlabel("check-in latency, ms (client side)")
    cdf.set_ylabel("fraction of check-ins")
    cdf.set_title(f"{results['agents']:,} agents, {results['concurrency']} at once")
    cdf.legend()
    by_phase: dict[str, list[tuple[float, float]]] = {}
    for t, late, name in run["timeline"]:
        by_phase.setdefault(name, []).append((t, late * 1000))
    for name, points in by_phase.items():
        line.scatter([p[0] for p in points], [p[1] for p in points], s=4, label=name)
    line.axhline(STALL * 1000, color="grey", linestyle=":", label="50 ms")
    line.set_yscale("log")
    line.set_xlabel("seconds since the relay started")
    line.set_ylabel("tick lateness, ms (> 1 ms shown)")
    line.set_title("event-loop stalls by phase")
    line.legend(markerscale=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--runs", type=int, default=3, help="runs; medians and min–max over them (3)"
    )
    parser.add_argument("--agents", type=int, default=AGENTS, help=f"agents ({AGENTS})")
    parser.add_argument(
        "--concurrency", type=int, default=CONCURRENCY, help=f"check-ins at once ({CONCURRENCY})"
    )
    parser.add_argument("--plot", type=Path, help="write a PNG: check-in CDF, stall timeline")
    parser.add_argument(
        "--append",
        action="store_true",
        help="add these runs to those saved in --json (to alternate with another checkout "
        "run by run)",
    )
    parser.add_argument(
        "--blob-kib", type=int, default=BLOB // 1024, help=f"KiB per version ({BLOB // 1024})"
    )
    parser.add_argument(
        "--work", type=Path, default=WORK / "scale", help="work directory (benchmarks/_work/scale)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=WORK / "scale.json",
        help="results (benchmarks/_work/scale.json)",
    )
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
        cwd=Path(__file__).parent,
    ).stdout.strip()
    blob = args.blob_kib * 1024
    runs = json.loads(args.json.read_text())["runs"] if args.append and args.json.exists() else []
    for i in range(args.runs):
        runs.append(
            one_run(args.work.resolve(), args.agents, args.concurrency, blob) | {"commit": commit}
        )
        print(f"run {i + 1}/{args.runs} done, load average {runs[-1]['load_end']}", flush=True)
    results = {
        "machine": machine(),
        "command": " ".join(["python", "benchmarks/scale_bench.py", *sys.argv[1:]]),
        "commit": commit,
        "agents": args.agents,
        "concurrency": args.concurrency,
        "blob_bytes": blob,
        "runs": runs,
        "summary": summarize(runs),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results))
    report(results)
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()

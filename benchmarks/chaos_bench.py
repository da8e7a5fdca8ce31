"""Chaos: clients verifying every body while faults hit the origin and the store at random.

One relay (in this process, so the store's writes can be made to fail), a misbehaving origin
(``tests/chaos.py``: cuts at random offsets, wrong prefixes, Range ignored, trickles, endless
metadata, resets, 5xx storms) and CLIENTS clients that download random targets for SECONDS
seconds and check the sha256 of every complete body. Stored blobs are removed at random
(as an eviction would) so fills keep going under the faults; the vendor publishes a new version now and then, so
syncs run under faults too. At the end the faults stop and the relay must recover.

Reported: bodies verified, wrong bodies (must be 0), failed transfers, stuck fills after the
faults end (must be 0), whether the sync loop is alive and syncs again, and the relay's RSS
at start and end.

    python benchmarks/chaos_bench.py [--seconds 180] [--clients 50]
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import machine  # noqa: E402
from benchmarks._inprocess import inprocess_relay  # noqa: E402
from relay.cache.mirror import SyncResult  # noqa: E402
from relay.publisher.repository import Repository  # noqa: E402
from tests.chaos import ChaosOrigin, FailingWrites, Mode  # noqa: E402

SECONDS = 180
CLIENTS = 50
TARGETS = 12
SIZES = (50_000, 400_000, 2_000_000)
FAULT_SHARE = 0.3  # of origin requests answered by a fault
STORE_FAULT_SHARE = 0.15  # of the time the store's writes fail


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def main(seconds: float, clients: int, seed: int) -> dict[str, object]:
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="relay-chaos-"))
    repo = Repository.init(work / "repo")
    contents: dict[str, bytes] = {}
    for i in range(TARGETS):
        data = rng.randbytes(SIZES[i % len(SIZES)])
        t = repo.add_bytes(data, "f.bin", product=f"p{i}", version="1.0.0", kind="content")
        contents[t.sha256] = data
    faults = list(Mode)
    faults.remove(Mode.OK)
    origin = ChaosOrigin(repo.public_dir, rng=random.Random(seed + 1))
    chaos_on = True

    def choose(path: str) -> Mode:
        if not chaos_on or rng.random() > FAULT_SHARE:
            return Mode.OK
        mode = rng.choice(faults)
        if mode is Mode.ENDLESS and not path.startswith("metadata/"):
            return Mode.STORM
        return mode

    origin.chooser = choose
    origin_runner = web.AppRunner(origin.app())
    await origin_runner.setup()
    origin_site = web.TCPSite(origin_runner, "127.0.0.1", 0)
    await origin_site.start()
    origin_port = origin_runner.addresses[0][1]
    total = sum(len(d) for d in contents.values())
    runner, base, state = await inprocess_relay(
        work,
        repo.root_bytes(1),
        f"http://127.0.0.1:{origin_port}/",
        **{
            "upstream.retries": 2,
            "upstream.retry_backoff": 0.05,
            "upstream.read_timeout": 2,
            "upstream.min_rate": 4096,
            "sync.interval": 5,
            "sync.prefetch": "none",
            "store.max_bytes": total * 4,
            "store.keep_versions": 0,
            "delta.enabled": False,
            # All clients share one address: no per-client cap, so faults are what they meet.
            "limits.max_transfers_per_agent": 0,
        },
    )
    rss_start = rss_kib()
    failing = FailingWrites(state.mirror.store.root, errno.ENOSPC)
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    deadline = time.monotonic() + seconds
    url_of = {t.sha256: f"{base}/targets/{t.url_path}" for t in repo.targets()}

    async def client(session: aiohttp.ClientSession, crng: random.Random) -> None:
        while time.monotonic() < deadline:
            sha = crng.choice(list(contents))
            try:
                async with session.get(url_of[sha]) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        counts["failed"] += 1
                        reasons[f"HTTP {resp.status}"] += 1
                        continue
            except (aiohttp.ClientError, TimeoutError) as e:
                counts["failed"] += 1
                reasons[type(e).__name__] += 1
                continue
            if hashlib.sha256(body).hexdigest() == sha and len(body) == len(contents[sha]):
                counts["verified"] += 1
            else:
                counts["wrong"] += 1

    async def store_faults() -> None:
        while time.monotonic() < deadline:
            failing.on = rng.random() < STORE_FAULT_SHARE
            await asyncio.sleep(rng.uniform(0.5, 3))
        failing.on = False

    async def evictor() -> None:
        store = state.mirror.store
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            idle = [sha for sha in store.digests() if not store.busy(sha)]
            if idle:
                await store.remove(rng.choice(idle))

    async def publisher() -> None:
        n = 1
        while time.monotonic() < deadline:
            await asyncio.sleep(15)
            n += 1
            i = rng.randrange(TARGETS)
            data = rng.randbytes(SIZES[i % len(SIZES)])
            t = await asyncio.to_thread(
                repo.add_bytes, data, "f.bin", product=f"p{i}", version=f"1.0.{n}", kind="content"
            )
            contents[t.sha256] = data
            url_of[t.sha256] = f"{base}/targets/{t.url_path}"

    timeout = aiohttp.ClientTimeout(total=60)
    with failing.installed():
        async with aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
        ) as session:
            await asyncio.gather(
                store_faults(),
                evictor(),
                publisher(),
                *(client(session, random.Random(seed + 10 + k)) for k in range(clients)),
            )
    # The faults end: the relay must recover.
    chaos_on = False
    await asyncio.sleep(3)
    stuck = [f.sha256 for f in state.mirror.store._fills.values()]  # noqa: SLF001
    # Targets whose upstream copy failed verification back off (503 Retry-After) for up to
    # an hour; an operator ends that with `relay admin sync`, which is what this does.
    state.mirror.clear_backoff()
    sync_after = await state.mirror.sync_once()
    async with aiohttp.ClientSession(timeout=timeout) as session:
        recovered = 0
        for sha in contents:
            if sha not in url_of:
                continue
            async with session.get(url_of[sha]) as resp:
                body = await resp.read()
                if resp.status == 200 and hashlib.sha256(body).hexdigest() == sha:
                    recovered += 1
    result = {
        "machine": machine(),
        "command": f"python benchmarks/chaos_bench.py --seconds {seconds:g} --clients {clients} --seed {seed}",
        "seconds": seconds,
        "clients": clients,
        "bodies_verified": counts["verified"],
        "wrong_bodies": counts["wrong"],
        "failed_transfers": counts["failed"],
        "failure_kinds": dict(reasons.most_common(8)),
        "origin_modes": {m.value: n for m, n in origin.modes_used.items()},
        "store_write_failures": failing.failed,
        "stuck_fills_after_faults": len(stuck),
        "sync_loop_alive": "sync" in state.background.running(),
        "failing_loops": sorted(state.background.failing()),
        "sync_after_faults": sync_after.value,
        "targets_served_right_after_faults": f"{recovered}/{len(url_of)}",
        "rss_kib_start": rss_start,
        "rss_kib_end": rss_kib(),
    }
    await runner.cleanup()
    await origin_runner.cleanup()
    assert sync_after in (SyncResult.NEW, SyncResult.UNCHANGED)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=SECONDS)
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    out = asyncio.run(main(args.seconds, args.clients, args.seed))
    print(json.dumps(out, indent=1))

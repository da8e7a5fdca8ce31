"""A month of hourly signature versions through a relay whose store quota holds ten of them.

VERSIONS publishes (720 = 30 days x 24 hours) of a SIZE-byte content target with small
changes each time; the relay (`store.max_bytes` = 10 versions, `store.keep_versions` = 1,
zstd deltas, prefetch by policy) syncs after each publish, and an agent that has the
previous version checks in, takes the patch when one is offered, and downloads the full
new version. The publisher keeps the newest KEEP_PUBLISHED versions (older ones are removed
from the repository, as a vendor prunes).

Reported: how many versions were served right on their first request (must be all), how
many check-ins were offered a patch, 503 answers, evictions, the most bytes the store ever
held against its quota, and seconds per version.

    python benchmarks/month_bench.py [--versions 720] [--size 3000000]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import machine  # noqa: E402
from benchmarks._inprocess import inprocess_relay  # noqa: E402
from relay.publisher.repository import Repository  # noqa: E402

VERSIONS = 720
SIZE = 3_000_000
QUOTA_VERSIONS = 10
KEEP_PUBLISHED = 24


def _edit(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(60):
        at = rng.randrange(len(out) - 32)
        out[at : at + 32] = rng.randbytes(32)
    return bytes(out)


async def main(versions: int, size: int) -> dict[str, object]:
    rng = random.Random(3)
    work = Path(tempfile.mkdtemp(prefix="relay-month-"))
    repo = Repository.init(work / "repo")
    content = rng.randbytes(size)
    published = [
        repo.add_bytes(content, "sigs.db", product="sigs", version="1.0.0", kind="content")
    ]
    origin_app = web.Application()
    origin_app.router.add_static("/", repo.public_dir)
    origin = web.AppRunner(origin_app, access_log=None)
    await origin.setup()
    await web.TCPSite(origin, "127.0.0.1", 0).start()
    quota = QUOTA_VERSIONS * size
    runner, base, state = await inprocess_relay(
        work,
        repo.root_bytes(1),
        f"http://127.0.0.1:{origin.addresses[0][1]}/",
        **{
            "sync.interval": 86400,
            "sync.prefetch": "policy",
            "store.max_bytes": quota,
            "store.keep_versions": 1,
            "delta.formats": ["zstd"],
            "delta.bases": 1,
        },
    )
    store = state.mirror.store
    first_ok = delta_offers = unavailable = 0
    peak = 0
    installed = None
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        for n in range(versions):
            if n:
                content = _edit(rng, content)
                target = await asyncio.to_thread(
                    repo.add_bytes,
                    content,
                    "sigs.db",
                    product="sigs",
                    version=f"1.0.{n}",
                    kind="content",
                )
                published.append(target)
                while len(published) > KEEP_PUBLISHED:
                    await asyncio.to_thread(repo.remove, published.pop(0).path)
            await state.mirror.sync_once()
            await state.mirror.prefetch_now()
            await state.deltas.compute_all(state.mirror.current)
            peak = max(peak, store.used_bytes)
            body = {
                "agent_id": "pc",
                "accept_delta": ["zstd"],
                "installed": [installed] if installed else [],
            }
            async with http.post(f"{base}/v1/checkin", json=body) as resp:
                offer = (await resp.json())["offers"][0]
            if offer["delta"] is not None:
                async with http.get(offer["delta"]["url"]) as resp:
                    delta_offers += resp.status == 200
            url = f"{base}/targets/{offer['target'].rsplit('/', 1)[0]}/{offer['sha256']}.sigs.db"
            async with http.get(url) as resp:
                data = await resp.read()
                unavailable += resp.status == 503
                if (
                    resp.status == 200
                    and hashlib.sha256(data).hexdigest() == hashlib.sha256(content).hexdigest()
                ):
                    first_ok += 1
            peak = max(peak, store.used_bytes)
            installed = {"product": "sigs", "version": offer["version"], "sha256": offer["sha256"]}
    elapsed = time.monotonic() - started
    await runner.cleanup()
    await origin.cleanup()
    return {
        "machine": machine(),
        "command": f"python benchmarks/month_bench.py --versions {versions} --size {size}",
        "versions": versions,
        "size_bytes": size,
        "quota_bytes": quota,
        "served_right_on_first_request": first_ok,
        "checkins_with_a_patch": delta_offers,
        "answers_503": unavailable,
        "store_full_refusals": store.stats.full_refusals,
        "evictions": store.stats.evictions,
        "peak_store_bytes": peak,
        "peak_over_quota": peak > quota,
        "seconds_per_version": round(elapsed / versions, 3),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--versions", type=int, default=VERSIONS)
    parser.add_argument("--size", type=int, default=SIZE)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.versions, args.size)), indent=1))

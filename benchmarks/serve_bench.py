"""Serving cached blobs and metadata: relay (one process) beside nginx, same files, same run.

Figures (issue "fan-out under load", a and b):
  a. 1 MiB blobs at 64 connections: throughput, relay / nginx (1 worker); nginx 2 workers too.
     64 MiB blobs at 64 connections: server CPU seconds per MB sent.
  b. a 4 KiB metadata file at 64 connections: requests per second.

Load comes from wrk (Debian package), 2 threads, on the same 2-core machine as both servers,
so all figures share the same handicap. Run:  python benchmarks/serve_bench.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

from benchmarks._common import (  # noqa: E402
    WORK,
    cpu_seconds,
    free_port,
    machine,
    nginx,
    nginx_workers_cpu,
    relay_process,
    save,
    wrk,
)
from relay.publisher.repository import Repository  # noqa: E402

CONNECTIONS = 64
MIB = 1024 * 1024


def build_repo(path: Path) -> tuple[Repository, dict[str, str]]:
    if path.exists():
        shutil.rmtree(path)
    repo = Repository.init(path)
    small = repo.add_bytes(os.urandom(MIB), "one.bin", product="one", version="1.0.0")
    big = repo.add_bytes(os.urandom(64 * MIB), "big.bin", product="big", version="1.0.0")
    # Enough targets that N.targets.json is about 4 KiB.
    i = 0
    while True:
        repo.add_bytes(os.urandom(64), f"f{i}.bin", product=f"p{i}", version="1.0.0")
        i += 1
        md = max(repo.metadata_dir.glob("*.targets.json"), key=lambda p: int(p.name.split(".")[0]))
        if md.stat().st_size >= 4096:
            break
    return repo, {
        "1MiB": f"/targets/{small.url_path}",
        "64MiB": f"/targets/{big.url_path}",
        "4KiB": f"/metadata/{md.name}",
    }


def measure(base: str, path: str, pid: int, seconds: int, nginx_master: bool) -> dict:
    before = nginx_workers_cpu(pid) if nginx_master else cpu_seconds(pid)
    result = wrk(base + path, CONNECTIONS, seconds)
    after = nginx_workers_cpu(pid) if nginx_master else cpu_seconds(pid)
    result["cpu_s"] = after - before
    result["seconds"] = seconds
    mb = result["bytes_per_s"] * seconds / 1e6
    result["cpu_ms_per_mb"] = 1000 * result["cpu_s"] / mb if mb else float("nan")
    del result["raw"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    repo, paths = build_repo(WORK / "serve-repo")
    root = WORK / "serve-root.json"
    root.write_bytes(repo.root_bytes(1))
    results: dict[str, dict] = {"machine": machine()}
    n1, n2, rp = free_port(), free_port(), free_port()
    data = WORK / "serve-relay-data"
    shutil.rmtree(data, ignore_errors=True)
    with nginx(repo.public_dir, n1, workers=1) as ng1:
        with relay_process(f"http://127.0.0.1:{n1}/", root, data, rp) as relay:
            # Warm: every blob cached (prefetch) and every file in the page cache.
            for path in paths.values():
                wrk(f"http://127.0.0.1:{rp}{path}", 4, 1)
            for name, path in paths.items():
                results[f"nginx1/{name}"] = measure(
                    f"http://127.0.0.1:{n1}", path, ng1.pid, args.seconds, True
                )
                results[f"relay/{name}"] = measure(
                    f"http://127.0.0.1:{rp}", path, relay.pid, args.seconds, False
                )
    with nginx(repo.public_dir, n2, workers=2) as ng2:
        for name, path in paths.items():
            results[f"nginx2/{name}"] = measure(
                f"http://127.0.0.1:{n2}", path, ng2.pid, args.seconds, True
            )
    save("serve", results)
    print(f"machine: {results['machine']}")
    print(f"{'case':<16}{'req/s':>10}{'MB/s':>10}{'CPU ms/MB':>11}{'p99':>10}{'non-2xx':>9}")
    for key, r in results.items():
        if key == "machine":
            continue
        print(
            f"{key:<16}{r['rps']:>10.0f}{r['bytes_per_s'] / 1e6:>10.1f}{r['cpu_ms_per_mb']:>11.3f}{r['p99']:>10}{r['non_2xx']:>9}"
        )
    r = results
    print()
    print(
        f"a. 1 MiB throughput relay/nginx1: {r['relay/1MiB']['bytes_per_s'] / r['nginx1/1MiB']['bytes_per_s']:.2f}x (floor 0.8)"
    )
    print(
        f"   1 MiB throughput relay/nginx2: {r['relay/1MiB']['bytes_per_s'] / r['nginx2/1MiB']['bytes_per_s']:.2f}x"
    )
    print(
        f"   64 MiB CPU per MB relay/nginx1: {r['relay/64MiB']['cpu_ms_per_mb'] / r['nginx1/64MiB']['cpu_ms_per_mb']:.2f}x (ceiling 2)"
    )
    print(
        f"b. 4 KiB metadata req/s relay/nginx1: {r['relay/4KiB']['rps'] / r['nginx1/4KiB']['rps']:.2f}x (floor 0.25)"
    )


if __name__ == "__main__":
    main()

"""Cold fan-out and egress fairness: relay beside nginx, same upstream, same run.

c. A blob not yet cached; all clients start at once; the origin's total output is
   limited so that it needs 4 s to deliver the blob once. Cases: 200 clients on an
   8 MiB blob, 1,000 clients on a 1 MiB blob. Reported: upstream bytes / blob size,
   and when the last client finished (target: 1.00 and <= 1.25 x 4 s). nginx runs as
   a caching proxy with ``proxy_cache_lock on`` (its default 5 s lock timeout) against
   the same limited origin.
d. 50 agents download a cached blob over and over for 10 s under an egress cap of
   20 MiB/s: delivered rate against the cap (within 5 %) and Jain's fairness index of
   per-agent bytes (>= 0.95). nginx has no shared egress cap; beside it we report nginx
   with ``limit_rate`` = cap / 50 per connection, its nearest equivalent.

Run:  python benchmarks/fanout_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

from benchmarks._common import WORK, free_port, machine, nginx, relay_process, save, wait_http  # noqa: E402
from relay.core.rates import jain_index  # noqa: E402
from relay.publisher.repository import Repository  # noqa: E402

MIB = 1024 * 1024
UPSTREAM_SECONDS = 4.0
CASES = [(200, 8 * MIB), (1000, 1 * MIB)]
FAIR_AGENTS = 50
FAIR_CAP = 20 * MIB
FAIR_SECONDS = 10.0
LOAD = [sys.executable, str(Path(__file__).parent / "_load.py")]


@contextmanager
def origin(public: Path, rate: int):
    port = free_port()
    proc = subprocess.Popen([*LOAD, "origin", str(public), str(port), str(rate)])
    try:
        wait_http(f"http://127.0.0.1:{port}/_stats")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def stats(base: str) -> dict:
    with urllib.request.urlopen(f"{base}/_stats") as r:
        return json.loads(r.read())


def run_clients(url: str, n: int, sha: str, timeout: float = 60) -> dict:
    out = subprocess.run(
        [*LOAD, "clients", url, str(n), sha, "--timeout", str(timeout)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def nginx_proxy(port: int, upstream: str, cache: Path):
    return nginx(Path("/nonexistent"), port, workers=1, proxy_to=upstream + "/", cache_dir=cache)


def cold_case(repo: Repository, root: Path, n: int, size: int) -> dict:
    target = repo.add_bytes(os.urandom(size), f"blob{n}.bin", product=f"fan{n}", version="1.0.0")
    path = f"targets/{target.url_path}"
    rate = int(size / UPSTREAM_SECONDS)
    out = {"clients": n, "size": size}
    with origin(repo.public_dir, rate) as up:
        port = free_port()
        data = WORK / f"fan-relay-{n}"
        shutil.rmtree(data, ignore_errors=True)
        with relay_process(up + "/", root, data, port, env={"RELAY_SYNC__PREFETCH": "none"}):
            before = stats(up).get(path, 0)
            res = run_clients(f"http://127.0.0.1:{port}/{path}", n, target.sha256)
            time.sleep(0.5)
            res["upstream_bytes"] = stats(up).get(path, 0) - before
        out["relay"] = res
    with origin(repo.public_dir, rate) as up:
        port = free_port()
        cache = WORK / f"fan-nginx-cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        with nginx_proxy(port, up, cache):
            res = run_clients(f"http://127.0.0.1:{port}/{path}", n, target.sha256)
            time.sleep(0.5)
            res["upstream_bytes"] = stats(up).get(path, 0)
        out["nginx"] = res
    for who in ("relay", "nginx"):
        r = out[who]
        r["upstream_ratio"] = r["upstream_bytes"] / size
        del r["bytes"]
    return out


def fairness(repo: Repository, root: Path) -> dict:
    target = repo.add_bytes(os.urandom(64 * MIB), "fair.bin", product="fair", version="1.0.0")
    path = f"targets/{target.url_path}"
    out: dict = {}
    with origin(repo.public_dir, 1024 * MIB) as up:
        port = free_port()
        data = WORK / "fair-relay"
        shutil.rmtree(data, ignore_errors=True)
        env = {"RELAY_LIMITS__EGRESS": str(FAIR_CAP)}
        with relay_process(up + "/", root, data, port, env=env):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}").read()  # cache it
            res = json.loads(
                subprocess.run(
                    [
                        *LOAD,
                        "stream",
                        f"http://127.0.0.1:{port}/{path}",
                        str(FAIR_AGENTS),
                        str(FAIR_SECONDS),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
        out["relay"] = res
    nport = free_port()
    conf_root = repo.public_dir
    with nginx_limited(conf_root, nport, FAIR_CAP // FAIR_AGENTS):
        res = json.loads(
            subprocess.run(
                [
                    *LOAD,
                    "stream",
                    f"http://127.0.0.1:{nport}/{path}",
                    str(FAIR_AGENTS),
                    str(FAIR_SECONDS),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        out["nginx_limit_rate"] = res
    for r in out.values():
        total = sum(r["per_agent"])
        r["rate"] = total / r["seconds"]
        r["rate_vs_cap"] = r["rate"] / FAIR_CAP
        r["jain"] = jain_index(r["per_agent"])
        del r["per_agent"]
    return out


@contextmanager
def nginx_limited(root: Path, port: int, per_connection: int):
    conf_dir = WORK / "nginx-limited"
    shutil.rmtree(conf_dir, ignore_errors=True)
    conf_dir.mkdir(parents=True)
    (conf_dir / "nginx.conf").write_text(f"""
worker_processes 1; pid {conf_dir}/nginx.pid; error_log {conf_dir}/error.log warn; daemon off;
events {{ worker_connections 4096; }}
http {{ access_log off; sendfile on; default_type application/octet-stream;
  client_body_temp_path {conf_dir}/b; proxy_temp_path {conf_dir}/p; fastcgi_temp_path {conf_dir}/f;
  uwsgi_temp_path {conf_dir}/u; scgi_temp_path {conf_dir}/s;
  server {{ listen 127.0.0.1:{port}; root {root}; limit_rate {per_connection}; }} }}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf_dir / "nginx.conf"), "-p", str(conf_dir)])
    wait_http(f"http://127.0.0.1:{port}/", ok=(200, 403, 404))
    try:
        yield
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["cold", "fair"])
    args = parser.parse_args()
    WORK.mkdir(exist_ok=True)
    repo_dir = WORK / "fan-repo"
    shutil.rmtree(repo_dir, ignore_errors=True)
    repo = Repository.init(repo_dir)
    root = WORK / "fan-root.json"
    root.write_bytes(repo.root_bytes(1))
    results: dict = {"machine": machine()}
    if args.only in (None, "cold"):
        results["cold"] = [cold_case(repo, root, n, size) for n, size in CASES]
    if args.only in (None, "fair"):
        results["fair"] = fairness(repo, root)
    save("fanout", results)
    print(f"machine: {results['machine']}")
    for case in results.get("cold", []):
        print(
            f"c. {case['clients']} clients, {case['size'] // MIB} MiB, upstream needs {UPSTREAM_SECONDS:.0f} s:"
        )
        for who in ("relay", "nginx"):
            r = case[who]
            last = f"{r['last_done_s']:.2f} s" if r["last_done_s"] else "none"
            print(
                f"   {who:<6} upstream/size {r['upstream_ratio']:.2f}  ok {r['ok']}/{r['clients']}"
                f"  last client {last} ({(r['last_done_s'] or 0) / UPSTREAM_SECONDS:.2f}x of 4 s)"
            )
    if "fair" in results:
        print(f"d. {FAIR_AGENTS} agents, cap {FAIR_CAP // MIB} MiB/s, {FAIR_SECONDS:.0f} s:")
        for who, r in results["fair"].items():
            print(
                f"   {who:<17} rate {r['rate'] / MIB:.2f} MiB/s ({r['rate_vs_cap']:.3f} of cap)  Jain {r['jain']:.3f}"
            )


if __name__ == "__main__":
    main()

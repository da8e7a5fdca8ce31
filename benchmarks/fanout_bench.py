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

Each run measures every relay tree given with ``--relay-tree`` (order turned round from run
to run) and nginx, each against its own fresh origin; the median and spread (min–max) over
the runs are printed and saved, and the clients' completion times are plotted
(``benchmarks/fanout_cold.png``) when matplotlib is installed.

Run:  python benchmarks/fanout_bench.py [--runs 3] [--only cold|fair] [--relay-tree DIR ...]
            [--event-loop asyncio|uvloop ...] [--workers N ...]
(each relay tree with each loop and each relay.workers given; one process unless --workers)
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

from benchmarks._common import (  # noqa: E402
    HERE,
    LOAD,
    WORK,
    Tree,
    add_run_options,
    free_port,
    loadavg,
    machine,
    nginx,
    origin,
    relay_process,
    save,
    spread,
    stats,
    summary,
    trees_of,
    wait_http,
)
from relay.core.rates import jain_index  # noqa: E402
from relay.publisher.repository import Repository  # noqa: E402

try:  # optional: only the plot needs it (pip install matplotlib)
    import matplotlib as mpl

    mpl.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    plt = None

MIB = 1024 * 1024
UPSTREAM_SECONDS = 4.0
CASES = [(200, 8 * MIB), (1000, 1 * MIB)]
FAIR_AGENTS = 50
FAIR_CAP = 20 * MIB
FAIR_SECONDS = 10.0
NGINX = "nginx"


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


def cold_case(repo: Repository, root: Path, trees: list[Tree], n: int, size: int, run: int) -> dict:
    target = repo.add_bytes(
        os.urandom(size), f"blob{n}-{run}.bin", product=f"fan{n}r{run}", version="1.0.0"
    )
    path = f"targets/{target.url_path}"
    rate = int(size / UPSTREAM_SECONDS)
    out: dict = {"clients": n, "size": size, "load_start": loadavg()}
    for tree in trees:
        with origin(repo.public_dir, rate) as up:
            port = free_port()
            data = WORK / f"fan-relay-{n}"
            shutil.rmtree(data, ignore_errors=True)
            env = {"RELAY_SYNC__PREFETCH": "none"}
            with relay_process(up + "/", root, data, port, env=env, tree=tree):
                before = stats(up).get(path, 0)
                res = run_clients(f"http://127.0.0.1:{port}/{path}", n, target.sha256)
                time.sleep(0.5)
                res["upstream_bytes"] = stats(up).get(path, 0) - before
            res["load"] = loadavg()
            out[tree.label] = res
    with origin(repo.public_dir, rate) as up:
        port = free_port()
        cache = WORK / f"fan-nginx-cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        with nginx_proxy(port, up, cache):
            res = run_clients(f"http://127.0.0.1:{port}/{path}", n, target.sha256)
            time.sleep(0.5)
            res["upstream_bytes"] = stats(up).get(path, 0)
        res["load"] = loadavg()
        out[NGINX] = res
    for who in [t.label for t in trees] + [NGINX]:
        r = out[who]
        r["upstream_ratio"] = r["upstream_bytes"] / size
        r["last_vs_upstream"] = (r["last_done_s"] or float("inf")) / UPSTREAM_SECONDS
        del r["bytes"]
    return out


def stream(url: str) -> dict:
    return json.loads(
        subprocess.run(
            [*LOAD, "stream", url, str(FAIR_AGENTS), str(FAIR_SECONDS)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )


def fairness(repo: Repository, root: Path, trees: list[Tree], run: int) -> dict:
    target = repo.add_bytes(
        os.urandom(64 * MIB), f"fair-{run}.bin", product=f"fair{run}", version="1.0.0"
    )
    path = f"targets/{target.url_path}"
    out: dict = {}
    for tree in trees:
        with origin(repo.public_dir, 1024 * MIB) as up:
            port = free_port()
            data = WORK / "fair-relay"
            shutil.rmtree(data, ignore_errors=True)
            env = {"RELAY_LIMITS__EGRESS": str(FAIR_CAP)}
            with relay_process(up + "/", root, data, port, env=env, tree=tree):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}").read()  # cache it
                out[tree.label] = stream(f"http://127.0.0.1:{port}/{path}")
            out[tree.label]["load"] = loadavg()
    nport = free_port()
    with nginx_limited(repo.public_dir, nport, FAIR_CAP // FAIR_AGENTS):
        out["nginx_limit_rate"] = stream(f"http://127.0.0.1:{nport}/{path}")
        out["nginx_limit_rate"]["load"] = loadavg()
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


def summarize(runs: list[dict], trees: list[Tree]) -> dict:
    out: dict = {"cold": [], "fair": {}}
    who = [t.label for t in trees] + [NGINX]
    if runs[0].get("cold"):
        for i, (n, size) in enumerate(CASES):
            case: dict = {"clients": n, "size": size}
            for w in who:
                rows = [run["cold"][i][w] for run in runs]
                case[w] = {
                    "upstream_ratio": summary([r["upstream_ratio"] for r in rows]),
                    "ok": summary([r["ok"] for r in rows]),
                    "last_done_s": summary([r["last_done_s"] or float("inf") for r in rows]),
                    "last_vs_upstream": summary([r["last_vs_upstream"] for r in rows]),
                }
            out["cold"].append(case)
    if runs[0].get("fair"):
        for w in runs[0]["fair"]:
            rows = [run["fair"][w] for run in runs]
            out["fair"][w] = {
                k: summary([r[k] for r in rows]) for k in ("rate", "rate_vs_cap", "jain")
            }
    return out


def plot(runs: list[dict], trees: list[Tree], path: Path) -> bool:
    """Completion-time curves of the cold cases (every run); False when matplotlib is absent."""
    if plt is None:
        return False
    cold = [run["cold"] for run in runs if run.get("cold")]
    if not cold:
        return False
    fig, axes = plt.subplots(1, len(CASES), figsize=(6 * len(CASES), 4.2), squeeze=False)
    colours = ["tab:blue", "tab:orange", "tab:purple", "tab:brown"]
    styles = {t.label: colours[i % len(colours)] for i, t in enumerate(trees)} | {
        NGINX: "tab:green"
    }
    for ax, i in zip(axes[0], range(len(CASES))):
        n, size = CASES[i]
        for who, colour in styles.items():
            for k, run_cases in enumerate(cold):
                done = run_cases[i][who]["done_s"]
                ys = [(j + 1) / n for j in range(len(done))]
                ax.step(
                    done, ys, where="post", color=colour, alpha=0.8, label=who if k == 0 else None
                )
        ax.axvline(UPSTREAM_SECONDS, color="grey", linestyle=":", label="upstream alone (4 s)")
        ax.set_title(f"cold fan-out: {n} clients, {size // MIB} MiB blob")
        ax.set_xlabel("seconds since all clients started")
        ax.set_ylabel("fraction of clients done (sha256 checked)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{len(cold)} runs, one line per run", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["cold", "fair"])
    add_run_options(parser)
    args = parser.parse_args()
    trees = trees_of(args)
    WORK.mkdir(exist_ok=True)
    repo_dir = WORK / "fan-repo"
    shutil.rmtree(repo_dir, ignore_errors=True)
    repo = Repository.init(repo_dir)
    root = WORK / "fan-root.json"
    root.write_bytes(repo.root_bytes(1))
    runs = []
    for i in range(args.runs):
        order = trees if i % 2 == 0 else trees[::-1]
        run: dict = {"load_start": loadavg()}
        if args.only in (None, "cold"):
            run["cold"] = [cold_case(repo, root, order, n, size, i) for n, size in CASES]
        if args.only in (None, "fair"):
            run["fair"] = fairness(repo, root, order, i)
        run["load_end"] = loadavg()
        runs.append(run)
        print(
            f"run {i + 1}/{args.runs} done, load average {run['load_start']} -> {run['load_end']}"
        )
    results = {
        "machine": machine(),
        "trees": [t.describe() for t in trees],
        "runs": runs,
        "summary": summarize(runs, trees),
    }
    save("fanout", results)
    if plot(runs, trees, HERE / "fanout_cold.png"):
        print(f"plot: {HERE / 'fanout_cold.png'}")
    report(results)


def report(results: dict) -> None:
    s = results["summary"]
    print(f"machine: {results['machine']}")
    for i, run in enumerate(results["runs"], 1):
        print(
            f"run {i}: load average (1, 5, 15 min) {run['load_start']} at start, {run['load_end']} at end"
        )
    print(f"median (min–max) over {len(results['runs'])} runs")
    for case in s["cold"]:
        print(
            f"c. {case['clients']} clients, {case['size'] // MIB} MiB, upstream needs {UPSTREAM_SECONDS:.0f} s:"
        )
        for who, r in case.items():
            if not isinstance(r, dict):
                continue
            print(
                f"   {who:<16} upstream/size {spread(r['upstream_ratio'])}  ok {spread(r['ok'], '.0f')}"
                f"  last client {spread(r['last_done_s'])} s = {spread(r['last_vs_upstream'])}x of 4 s"
            )
    if s["fair"]:
        print(f"d. {FAIR_AGENTS} agents, cap {FAIR_CAP // MIB} MiB/s, {FAIR_SECONDS:.0f} s:")
        for who, r in s["fair"].items():
            rate = {k: v / MIB for k, v in r["rate"].items()}
            print(
                f"   {who:<17} rate {spread(rate)} MiB/s ({spread(r['rate_vs_cap'], '.3f')} of cap)"
                f"  Jain {spread(r['jain'], '.3f')}"
            )


if __name__ == "__main__":
    main()

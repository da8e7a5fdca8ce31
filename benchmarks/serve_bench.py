"""Serving cached blobs and metadata: relay beside nginx, same files, same run.

Figures (issue "fan-out under load", a and b):
  a. 1 MiB blobs at 64 connections: throughput, relay / nginx (1 worker); nginx 2 workers too.
     64 MiB blobs at 64 connections: server CPU seconds per MB sent.
  b. a 4 KiB metadata file at 64 connections: requests per second.

Load comes from wrk (Debian package), 2 threads, on the same 2-core machine as both servers,
so all figures share the same handicap. Each run measures nginx (1 worker), then every relay
tree given with ``--relay-tree`` (the order turns round from run to run, so a drift in the
machine's load does not always favour the same tree), then nginx (2 workers). Ratios to nginx
are taken within a run, then the median and the spread (min–max) over the runs are reported.

Run:  python benchmarks/serve_bench.py [--seconds 10] [--runs 3] [--relay-tree DIR ...]
            [--event-loop asyncio|uvloop ...] [--workers N ...] [--access-log] [--case C ...]
Each relay tree is measured with each --event-loop (relay.event_loop) and each --workers
(relay.workers; 1, one process, unless given) in the same run. Server CPU counts a
process and its children (nginx's workers, the relay's worker processes). ``--case``
measures only the cases named (``1MiB``, ``64MiB``, ``4KiB``; all by default): the ratios
of the cases left out are not reported.
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
    Tree,
    add_run_options,
    free_port,
    loadavg,
    machine,
    nginx,
    relay_process,
    save,
    spread,
    summary,
    tree_cpu,
    trees_of,
    wrk,
)
from relay.publisher.repository import Repository  # noqa: E402

CONNECTIONS = 64
MIB = 1024 * 1024
CASES = ("1MiB", "64MiB", "4KiB")
# Ratios within a run: (key, case, figure, anchor server). CPU per unit sent is steadier
# than rates on a shared machine.
RATIOS = (
    ("1MiB_vs_nginx1", "1MiB", "bytes_per_s", "nginx1"),
    ("1MiB_vs_nginx2", "1MiB", "bytes_per_s", "nginx2"),
    ("64MiB_cpu_vs_nginx1", "64MiB", "cpu_ms_per_mb", "nginx1"),
    ("4KiB_rps_vs_nginx1", "4KiB", "rps", "nginx1"),
    ("4KiB_rps_vs_nginx2", "4KiB", "rps", "nginx2"),
    ("1MiB_cpu_vs_nginx1", "1MiB", "cpu_ms_per_mb", "nginx1"),
    ("4KiB_cpu_vs_nginx1", "4KiB", "cpu_ms_per_mb", "nginx1"),
    ("4KiB_cpu_vs_nginx2", "4KiB", "cpu_ms_per_mb", "nginx2"),
)


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


def measure(base: str, path: str, pid: int, seconds: int) -> dict:
    before = tree_cpu(pid)
    result = wrk(base + path, CONNECTIONS, seconds)
    after = tree_cpu(pid)
    result["cpu_s"] = after - before
    result["seconds"] = seconds
    mb = result["bytes_per_s"] * seconds / 1e6
    result["cpu_ms_per_mb"] = 1000 * result["cpu_s"] / mb if mb else float("nan")
    result["p99_ms"] = p99_ms(result["p99"])
    result["load"] = loadavg()
    del result["raw"]
    return result


def p99_ms(text: str) -> float:
    for unit, scale in (("us", 1e-3), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float("nan")


def one_run(
    repo: Repository,
    root: Path,
    paths: dict[str, str],
    trees: list[Tree],
    seconds: int,
    env: dict[str, str],
    cases: tuple[str, ...] = CASES,
) -> dict:
    run: dict = {"load_start": loadavg()}
    n1, n2 = free_port(), free_port()
    with nginx(repo.public_dir, n1, workers=1) as ng1:
        for name in cases:
            run[f"nginx1/{name}"] = measure(f"http://127.0.0.1:{n1}", paths[name], ng1.pid, seconds)
        for tree in trees:
            rp = free_port()
            data = WORK / "serve-relay-data"
            shutil.rmtree(data, ignore_errors=True)
            with relay_process(
                f"http://127.0.0.1:{n1}/", root, data, rp, env=env, tree=tree
            ) as relay:
                # Warm: every blob cached (prefetch) and every file in the page cache.
                for path in (paths[name] for name in cases):
                    wrk(f"http://127.0.0.1:{rp}{path}", 4, 1)
                for name in cases:
                    run[f"{tree.label}/{name}"] = measure(
                        f"http://127.0.0.1:{rp}", paths[name], relay.pid, seconds
                    )
    with nginx(repo.public_dir, n2, workers=2) as ng2:
        for name in cases:
            run[f"nginx2/{name}"] = measure(f"http://127.0.0.1:{n2}", paths[name], ng2.pid, seconds)
    run["load_end"] = loadavg()
    for tree in trees:
        r = {k.split("/", 1)[1]: v for k, v in run.items() if k.startswith(tree.label + "/")}
        run[f"ratios/{tree.label}"] = {
            key: r[case][figure] / run[f"{anchor}/{case}"][figure]
            for key, case, figure, anchor in RATIOS
            if case in cases
        }
    return run


def summarize(runs: list[dict]) -> dict:
    out: dict = {}
    for key in runs[0]:
        if key.startswith("load"):
            continue
        out[key] = {
            figure: summary([run[key][figure] for run in runs])
            for figure, value in runs[0][key].items()
            if isinstance(value, float | int) and not isinstance(value, bool)
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=int, default=10, help="seconds of load per case (10)")
    parser.add_argument(
        "--access-log",
        action="store_true",
        help="relays write their access log (to /dev/null), as by default; off otherwise",
    )
    parser.add_argument(
        "--case",
        action="append",
        choices=CASES,
        help="measure only this case (repeatable; default: every case)",
    )
    add_run_options(parser)
    args = parser.parse_args()
    cases = tuple(c for c in CASES if c in (args.case or CASES))
    env = {"RELAY_RELAY__ACCESS_LOG": "true"} if args.access_log else {}
    trees = trees_of(args)
    WORK.mkdir(exist_ok=True)
    repo, paths = build_repo(WORK / "serve-repo")
    root = WORK / "serve-root.json"
    root.write_bytes(repo.root_bytes(1))
    runs = []
    for i in range(args.runs):
        order = trees if i % 2 == 0 else trees[::-1]
        runs.append(one_run(repo, root, paths, order, args.seconds, env, cases))
        print(
            f"run {i + 1}/{args.runs} done, load average {runs[-1]['load_start']} -> {runs[-1]['load_end']}"
        )
    results = {
        "machine": machine(),
        "trees": [t.describe() for t in trees],
        "seconds": args.seconds,
        "access_log": args.access_log,
        "cases": list(cases),
        "runs": runs,
        "summary": summarize(runs),
    }
    save("serve", results)
    report(results, trees)


def report(results: dict, trees: list[Tree]) -> None:
    s = results["summary"]
    print(f"machine: {results['machine']}")
    for i, run in enumerate(results["runs"], 1):
        print(
            f"run {i}: load average (1, 5, 15 min) {run['load_start']} at start, {run['load_end']} at end"
        )
    print(
        f"median (min–max) over {len(results['runs'])} runs of {results['seconds']} s per case, "
        f"relay access log {'on' if results.get('access_log') else 'off'}"
    )
    print(f"{'case':<24}{'req/s':>22}{'MB/s':>22}{'CPU ms/MB':>24}{'p99 ms':>22}")
    servers = ["nginx1", *(t.label for t in trees), "nginx2"]
    cases = results.get("cases", CASES)
    for name in cases:
        for server in servers:
            r = s[f"{server}/{name}"]
            print(
                f"{server + '/' + name:<24}{spread(r['rps'], '.0f'):>22}"
                f"{spread({k: v / 1e6 for k, v in r['bytes_per_s'].items()}, '.0f'):>22}"
                f"{spread(r['cpu_ms_per_mb'], '.3f'):>24}{spread(r['p99_ms'], '.1f'):>22}"
            )
    print()
    lines = {
        "1MiB_vs_nginx1": "a. 1 MiB throughput relay/nginx1: {}x (floor 0.8)",
        "1MiB_vs_nginx2": "   1 MiB throughput relay/nginx2: {}x",
        "64MiB_cpu_vs_nginx1": "   64 MiB CPU per MB relay/nginx1: {}x (ceiling 2)",
        "4KiB_rps_vs_nginx1": "b. 4 KiB metadata req/s relay/nginx1: {}x (floor 0.25)",
        "4KiB_rps_vs_nginx2": "   4 KiB metadata req/s relay/nginx2: {}x",
        "1MiB_cpu_vs_nginx1": "   1 MiB CPU per MB relay/nginx1: {}x",
        "4KiB_cpu_vs_nginx1": "   4 KiB CPU per request relay/nginx1: {}x",
        "4KiB_cpu_vs_nginx2": "   4 KiB CPU per request relay/nginx2: {}x",
    }
    for tree in trees:
        r = s[f"ratios/{tree.label}"]
        print(f"{tree.label}:")
        for key, line in lines.items():
            if key in r:
                print("  " + line.format(spread(r[key])))


if __name__ == "__main__":
    main()

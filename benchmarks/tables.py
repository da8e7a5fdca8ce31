"""Print the Markdown tables of RESULTS.md from the JSON the benchmarks saved.

Every cell is ``median (min–max)`` over the runs of the file. Run:

    python benchmarks/tables.py serve benchmarks/_work/serve.json
    python benchmarks/tables.py fanout benchmarks/_work/fanout.json
    python benchmarks/tables.py delta NEW/_work/delta.json [OLD/_work/delta.json]
    python benchmarks/tables.py scale AFTER.json BEFORE.json   # scale_bench.py --json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

from benchmarks._common import spread  # noqa: E402

MIB = 1024 * 1024


def loads(results: dict) -> str:
    return "; ".join(
        f"run {i}: {run['load_start'].split()[0]} → {run['load_end'].split()[0]}"
        for i, run in enumerate(results["runs"], 1)
    )


def serve(results: dict) -> None:
    s = results["summary"]
    trees = [t.get("label", f"relay@{t['commit']}") for t in results["trees"]]
    print(
        f"{len(results['runs'])} runs of {results['seconds']} s per case; 1-minute load average {loads(results)}\n"
    )
    print("| case | server | req/s | MB/s | server CPU ms/MB | p99 ms |")
    print("|---|---|---:|---:|---:|---:|")
    names = {"1MiB": "1 MiB blob", "64MiB": "64 MiB blob", "4KiB": "4 KiB metadata"}
    for case, label in names.items():
        if f"nginx1/{case}" not in s:  # not measured (serve_bench --case)
            continue
        for server in ["nginx1", *trees, "nginx2"]:
            r = s[f"{server}/{case}"]
            shown = {"nginx1": "nginx, 1 worker", "nginx2": "nginx, 2 workers"}.get(
                server, f"**{server}**"
            )
            mbs = {k: v / 1e6 if k != "runs" else v for k, v in r["bytes_per_s"].items()}
            print(
                f"| {label} | {shown} | {spread(r['rps'], '.0f')} | {spread(mbs, '.0f')} "
                f"| {spread(r['cpu_ms_per_mb'], '.3f')} | {spread(r['p99_ms'], '.1f')} |"
            )
    print("\n| ratio (within each run) | " + " | ".join(trees) + " |")
    print("|---|" + "---:|" * len(trees))
    rows = {
        "1MiB_vs_nginx1": "a. 1 MiB throughput / nginx 1 worker (floor 0.8)",
        "1MiB_vs_nginx2": "1 MiB throughput / nginx 2 workers",
        "64MiB_cpu_vs_nginx1": "64 MiB server CPU per MB / nginx 1 worker (ceiling 2)",
        "4KiB_rps_vs_nginx1": "b. 4 KiB metadata req/s / nginx 1 worker (floor 0.25)",
        "4KiB_rps_vs_nginx2": "4 KiB metadata req/s / nginx 2 workers",
        "1MiB_cpu_vs_nginx1": "1 MiB server CPU per MB / nginx 1 worker",
        "4KiB_cpu_vs_nginx1": "4 KiB server CPU per request / nginx 1 worker",
        "4KiB_cpu_vs_nginx2": "4 KiB server CPU per request / nginx 2 workers",
    }
    for key, label in rows.items():
        if key not in s[f"ratios/{trees[0]}"]:  # not measured, or an older version of the script
            continue
        cells = " | ".join(f"{spread(s[f'ratios/{t}'][key])}x" for t in trees)
        print(f"| {label} | {cells} |")


def fanout(results: dict) -> None:
    s = results["summary"]
    print(f"{len(results['runs'])} runs; 1-minute load average {loads(results)}\n")
    if s["cold"]:
        print(
            "| case | server | upstream bytes / blob | clients OK | last client done, s | of the 4 s upstream |"
        )
        print("|---|---|---:|---:|---:|---:|")
        for case in s["cold"]:
            label = f"{case['clients']} clients, {case['size'] // MIB} MiB"
            for who, r in case.items():
                if not isinstance(r, dict):
                    continue
                shown = "nginx proxy_cache_lock" if who == "nginx" else f"**{who}**"
                print(
                    f"| {label} | {shown} | {spread(r['upstream_ratio'])} | {spread(r['ok'], '.0f')} "
                    f"| {spread(r['last_done_s'])} | {spread(r['last_vs_upstream'])}x |"
                )
    if s["fair"]:
        print("\n| server | delivered MiB/s | of the cap | Jain's index |")
        print("|---|---:|---:|---:|")
        for who, r in s["fair"].items():
            rate = {k: v / MIB if k != "runs" else v for k, v in r["rate"].items()}
            shown = (
                "nginx, limit_rate cap/50 per connection"
                if who == "nginx_limit_rate"
                else f"**{who}**, egress 20 MiB/s"
            )
            print(
                f"| {shown} | {spread(rate)} | {spread(r['rate_vs_cap'], '.3f')} | {spread(r['jain'], '.3f')} |"
            )


def delta(new: dict, old: dict | None) -> None:
    s = new["summary"]
    print(f"{len(new['runs'])} runs; 1-minute load average {loads(new)}\n")
    print(
        "| pair | tool | new MB | patch % of new | diff s | diff peak MB | apply s | apply peak MB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in s["rows"]:
        first = True
        for tool in ("bsdiff4", "zstd", "zstd-19", "zstd-cli", "xdelta3"):
            if tool not in r:
                continue
            m = r[tool]
            label = r["label"].replace("->", "→") if first else ""
            mb = f"{r['new_bytes'] / 1e6:.1f}"
            shown = {"zstd-19": "zstd level 19", "zstd-cli": "zstd CLI", "xdelta3": "xdelta3"}.get(
                tool, f"**{tool}**"
            )
            print(
                f"| {label} | {shown} | {mb} | {m['pct']['median']:.2f} | {spread(m['diff_s'])} "
                f"| {spread(m['diff_peak_mb'], '.0f')} | {spread(m['apply_s'])} | {spread(m['apply_peak_mb'], '.0f')} |"
            )
            first = False
    if old is None:
        return
    o = old["summary"]
    print(
        f"\nBefore/after, the relay's own formats ({len(old['runs'])} and {len(new['runs'])} runs, turn about):\n"
    )
    print(
        "| pair | format | patch % before → after | diff s before | diff s after | apply s before | apply s after |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for ro, rn in zip(o["rows"], s["rows"]):
        for tool in ("bsdiff4", "zstd"):
            a, b = ro[tool], rn[tool]
            print(
                f"| {rn['label'].replace('->', '→')} | {tool} | {a['pct']['median']:.2f} → {b['pct']['median']:.2f} "
                f"| {spread(a['diff_s'])} | {spread(b['diff_s'])} | {spread(a['apply_s'])} | {spread(b['apply_s'])} |"
            )
    print("\n| worst event-loop stall while the engine diffs | before | after |")
    print("|---|---:|---:|")
    for fmt in s["stalls"]:
        if fmt in o["stalls"]:
            print(
                f"| {fmt} ({s['stalls'][fmt]['pair']}) | {spread(o['stalls'][fmt]['worst_stall_ms'], '.0f')} ms "
                f"| {spread(s['stalls'][fmt]['worst_stall_ms'], '.0f')} ms |"
            )


def scale(after: dict, before: dict) -> None:
    """Two checkouts' scale_bench.py runs (turn about) side by side."""
    b, a = before["summary"], after["summary"]
    commits = [f"relay@{r['runs'][0].get('commit', '?')}" for r in (before, after)]
    for label, r in zip(commits, (before, after)):
        print(f"{label}: {len(r['runs'])} runs; 1-minute load average {loads(r)}")
    print(
        f"\n| phase | worst stall, {commits[0]} | worst stall, **{commits[1]}** | ticks late > 50 ms | longest full GC |"
    )
    print("|---|---:|---:|---:|---:|")
    for name, st in a["stalls"].items():
        o = b["stalls"][name]
        print(
            f"| {name} | {spread(o['worst_ms'], ',.0f')} ms | **{spread(st['worst_ms'], ',.0f')} ms** "
            f"| {spread(o['over_50ms'], '.0f')} → {spread(st['over_50ms'], '.0f')} "
            f"| {spread(o['gc_worst_ms'], ',.0f')} → {spread(st['gc_worst_ms'], ',.0f')} ms |"
        )
    print("\n| check-ins, 64 at once | relay | p50 ms | p90 ms | p99 ms | max ms | per second |")
    print("|---|---|---:|---:|---:|---:|---:|")
    n = f"{after['agents']:,}"
    for kind, label in (("populate", f"{n} new agents"), ("checkin", f"{n} registered again")):
        for who, r in zip(commits, (b, a)):
            c = r[kind]
            cells = " | ".join(
                spread(c[k], ",.0f") for k in ("p50_ms", "p90_ms", "p99_ms", "max_ms", "per_second")
            )
            print(f"| {label} | {who} | {cells} |")
    rows = {
        "rss_per_agent": ("RSS growth per agent while they register, B", ",.0f"),
        "metrics_worst_seconds": ("`GET /metrics`, slowest of five, s", ".3f"),
        "listing_seconds": ("admin listing, every agent, s", ".2f"),
        "listing_worst_page_seconds": ("admin listing, slowest answer, s", ".3f"),
        "restart_ready_seconds": ("restart to ready, s", ".2f"),
        "empty_ready_seconds": ("start to ready, empty data directory (anchor), s", ".2f"),
        "restart_rss_mib": ("RSS after the restart, MiB", ".0f"),
        "restart_rss_per_agent": ("restarted RSS over the empty start, B per agent", ",.0f"),
    }
    print(f"\n| | {commits[0]} | **{commits[1]}** |")
    print("|---|---:|---:|")
    print(f"| admin listing | {', '.join(b['listing_mode'])} | {', '.join(a['listing_mode'])} |")
    for key, (label, fmt) in rows.items():
        print(f"| {label} | {spread(b[key], fmt)} | **{spread(a[key], fmt)}** |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=["serve", "fanout", "delta", "scale"])
    parser.add_argument("file", type=Path)
    parser.add_argument(
        "before", type=Path, nargs="?", help="delta, scale: the other checkout's JSON"
    )
    args = parser.parse_args()
    results = json.loads(args.file.read_text())
    print(f"Machine: {results['machine']}\n")
    if args.kind == "serve":
        serve(results)
    elif args.kind == "fanout":
        fanout(results)
    elif args.kind == "scale":
        scale(results, json.loads(args.before.read_text()))
    else:
        delta(results, json.loads(args.before.read_text()) if args.before else None)


if __name__ == "__main__":
    main()

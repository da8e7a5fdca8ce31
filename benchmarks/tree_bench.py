"""A relay tree at scale: an origin, a top relay, three branch relays and 10,000 agents.

Per run, on this one machine:

* the origin: the publisher's static repository served over HTTP by ``_load.py origin``
  (unthrottled; it counts the body bytes it sends per path);
* a top relay (``relay serve``, upstream = the origin, polling it every second);
* three branch relays (``relay serve``, upstream = the top relay; they hold its
  ``GET /v1/events`` and sync when it answers; their own poll is an hour);
* AGENTS light agents (``_tree_agents.py``: asyncio, one aiohttp session per process,
  PROCESSES processes), agent ``i`` on branch ``i % 3``. They speak the agent protocol
  without python-tuf (the sha256 of each offer is checked; the metadata is not).

Sequence: everything starts; every agent checks in with version 1.0.0 installed and holds
``GET /v1/events``; once the branches hold AGENTS requests (``relay_events_held``), version
1.1.0 (SIZE random bytes, ``kind = content``: offered without approval) is published and the
clock starts. Each agent is woken by its branch, waits its ``delay_ms`` (``events.splay``),
checks in, downloads, verifies, reports ``installed`` and checks in again.

Recorded: publish → each agent's ``installed`` report (p50/p90/p99 and the last, per
branch); the blob's bytes on each link (the origin's count for its path; each relay's
``relay_upstream_bytes_total``, which also holds the metadata, beside the top relay's blob
bytes served); check-in latencies before and after the publish; each relay's CPU seconds
and peak RSS (``/proc``: ``stat``, ``VmHWM``) and its RSS every 0.5 s; the agents' errors.
Medians and min–max over ``--runs``. Writes ``benchmarks/tree_result.json``,
``tree_completion.png`` and ``tree_rss.png``.

    python benchmarks/tree_bench.py [--agents 10000] [--runs 3] [--size 1MiB]
    python benchmarks/tree_bench.py --smoke      # 300 agents, one run, under _work/
    python benchmarks/tree_bench.py --report benchmarks/tree_result.json   # the tables
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._common import (  # noqa: E402
    HERE,
    REPO,
    WORK,
    Tree,
    add_run_options,
    cpu_seconds,
    free_port,
    loadavg,
    machine,
    origin,
    relay_process,
    spread,
    stats,
    summary,
)
from benchmarks._tree_agents import raise_nofile  # noqa: E402
from relay.config import default_config  # noqa: E402
from relay.core.units import parse_size  # noqa: E402
from relay.publisher.repository import Repository  # noqa: E402

AGENTS = 10_000
PROCESSES = 4
BRANCHES = 3
SIZE = "1MiB"
PRODUCT = "tree"
SMOKE_AGENTS = 300
PHASE_TIMEOUT = 600  # seconds: agents settled; every agent updated
HELD_TIMEOUT = 120  # seconds: the branches hold every agent's events request
SAMPLE_S = 0.5
PROBE_S = 1.0  # seconds between the probe's check-ins
PROBE_TIMEOUT = 60
AGENTS_SCRIPT = Path(__file__).parent / "_tree_agents.py"


IDLE_TIMEOUT = "120s"  # keep-alive: above the agents' 15 s, with room for a busy agent process


def relay_settings(fd_limit: int, splay: float) -> dict[str, str]:
    """The settings of every relay in the tree, as environment variables."""
    return {
        "RELAY_EVENTS__SPLAY": str(splay),
        "RELAY_RELAY__WORKERS": "1",  # one process per relay (the default is one per core)
        "RELAY_DELTA__ENABLED": "false",  # full blobs only: each link carries the blob once
        "RELAY_LIMITS__MAX_CONNECTIONS": str(fd_limit * 3 // 4),
        "RELAY_LIMITS__MAX_TRANSFERS_PER_AGENT": "8",
        "RELAY_STORE__SCRUB_INTERVAL": "0",
        "RELAY_LIMITS__IDLE_TIMEOUT": IDLE_TIMEOUT,
    }


TOP_SETTINGS = {
    "RELAY_SYNC__INTERVAL": "1",  # the top relay's poll of the origin: the clock starts there
    "RELAY_SYNC__JITTER": "0",
    # the branches come from one address without an agent id: one "agent" for the top relay
    "RELAY_LIMITS__MAX_TRANSFERS_PER_AGENT": "0",
}
BRANCH_SETTINGS = {"RELAY_SYNC__INTERVAL": "3600"}  # new content comes by the top's events


# -- reading the processes -------------------------------------------------------------


def scrape(port: int) -> dict[str, float]:
    """Every sample of a relay's ``/metrics``, by series (name and labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            out[series] = float(value)
    return out


def total(samples: dict[str, float], name: str, labels: str = "") -> float:
    """The sum of a metric's series whose labels contain ``labels``."""
    pattern = re.compile(rf"^{name}(\{{.*\}})?$")
    return sum(v for k, v in samples.items() if pattern.match(k) and labels in k)


def listen_drops() -> dict[str, int]:
    """The machine's TCP listen-queue overflows and drops so far (``/proc/net/netstat``)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            row = dict(zip(names.split()[1:], values.split()[1:]))
            return {k: int(row.get(k, 0)) for k in ("ListenOverflows", "ListenDrops")}
    return {}


def status_kib(pid: int, key: str) -> int:
    """A ``/proc/<pid>/status`` figure in KiB (``VmRSS``, ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} for {pid}")


class RssSampler:
    """Samples the RSS of some processes every SAMPLE_S seconds in a thread."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.samples: list[tuple[float, list[int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def max_gap(self) -> float:
        """The longest time between two samples: a stall of this process or the machine."""
        times = [t for t, _ in self.samples]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            try:
                self.samples.append((time.time(), [status_kib(p, "VmRSS") for p in self.pids]))
            except (OSError, RuntimeError):
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


class Probe:
    """One check-in a second, turn about on each branch, from a thread of this process.

    Its latency is the relay's answer time seen by a client that is not itself loaded
    (the agents' own figures include their processes' event-loop delays).
    """

    def __init__(self, ports: list[int], installed) -> None:
        self.ports = ports
        self.body = json.dumps(
            {
                "group": "default",
                "installed": [
                    {"product": PRODUCT, "version": installed.version, "sha256": installed.sha256}
                ],
                "accept_delta": [],
            }
        )
        self.samples: list[tuple[float, int, float, int]] = []  # time, branch, seconds, status
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _one(self, branch: int) -> None:
        agent = f"probe-{branch}"
        body = json.loads(self.body) | {"agent_id": agent}
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.ports[branch]}/v1/checkin",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Relay-Agent-Id": agent},
        )
        start = time.time()
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=PROBE_TIMEOUT) as r:
                r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            status = e.code
        except OSError:
            status = 0
        self.samples.append((start, branch, time.monotonic() - t0, status))

    def _run(self) -> None:
        branch = 0
        while not self._stop.wait(PROBE_S):
            self._one(branch)
            branch = (branch + 1) % len(self.ports)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(PROBE_TIMEOUT + 5)


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The next line a child prints, within ``timeout`` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise RuntimeError(f"agent process {proc.pid}: nothing printed in {timeout:.0f} s")
    return proc.stdout.readline().strip()


def wait_until(condition, what: str, seconds: float) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    print(f"timed out after {seconds:.0f} s: {what}", file=sys.stderr)
    return False


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


# -- one run -----------------------------------------------------------------------------


def run_once(index: int, args: argparse.Namespace, tree: Tree, fd_limit: int) -> dict:
    work = args.work / f"tree-{index}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    size = args.size
    repo = Repository.init(work / "repo")
    base = repo.add_bytes(
        os.urandom(size), "tree.bin", product=PRODUCT, version="1.0.0", kind="content"
    )
    root = work / "root.json"
    root.write_bytes(repo.root_bytes(1))
    common = relay_settings(fd_limit, args.splay)
    load_start = loadavg()
    drops0 = listen_drops()
    with ExitStack() as stack:
        up = stack.enter_context(origin(repo.public_dir, 0))
        top_port = free_port()
        top = stack.enter_context(
            relay_process(
                up + "/",
                root,
                work / "top",
                top_port,
                env={**common, **TOP_SETTINGS},
                tree=tree,
                log=work / "top.log",
            )
        )
        ports = [free_port() for _ in range(BRANCHES)]
        branches = [
            stack.enter_context(
                relay_process(
                    f"http://127.0.0.1:{top_port}/",
                    root,
                    work / f"branch{b}",
                    port,
                    env={**common, **BRANCH_SETTINGS},
                    tree=tree,
                    log=work / f"branch{b}.log",
                )
            )
            for b, port in enumerate(ports)
        ]
        relays = [top, *branches]
        sampler = RssSampler([p.pid for p in relays])
        stack.callback(sampler.stop)
        probe = Probe(ports, base)
        stack.callback(probe.stop)
        per = -(-args.agents // args.processes)
        urls = ",".join(f"http://127.0.0.1:{p}/" for p in ports)
        clients = []
        for k in range(args.processes):
            count = min(per, args.agents - k * per)
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(AGENTS_SCRIPT),
                    "--branches",
                    urls,
                    "--first",
                    str(k * per),
                    "--count",
                    str(count),
                    "--product",
                    PRODUCT,
                    "--version",
                    base.version,
                    "--sha256",
                    base.sha256,
                    "--want",
                    "1.1.0",
                    "--hold",
                    str(default_config().events.hold),
                    "--timeout",
                    str(PHASE_TIMEOUT),
                    "--out",
                    str(work / f"agents{k}.json"),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            clients.append(proc)
            stack.callback(_stop, proc)
        started = time.time()
        for proc in clients:
            line = read_line(proc, PHASE_TIMEOUT)
            assert line == "ready", line
        settled = wait_until(
            lambda: sum(total(scrape(p), "relay_events_held") for p in ports) >= args.agents,
            "every agent's events request held",
            HELD_TIMEOUT,
        )
        held = sum(total(scrape(p), "relay_events_held") for p in ports)
        settle_s = time.time() - started
        time.sleep(1)
        before = [scrape(p) for p in [top_port, *ports]]
        cpu0 = [cpu_seconds(p.pid) for p in relays]
        origin0 = stats(up)
        load_publish = loadavg()
        published = time.time()
        target = repo.add_bytes(
            os.urandom(size), "tree.bin", product=PRODUCT, version="1.1.0", kind="content"
        )
        for proc in clients:
            line = read_line(proc, PHASE_TIMEOUT + 60)
            assert line == "done", line
            proc.wait(60)
        after = [scrape(p) for p in [top_port, *ports]]
        cpu1 = [cpu_seconds(p.pid) for p in relays]
        peak = [status_kib(p.pid, "VmHWM") for p in relays]
        origin1 = stats(up)
        sampler.stop()
        probe.stop()
    agents = [json.loads((work / f"agents{k}.json").read_text()) for k in range(args.processes)]
    blob_path = f"targets/{target.url_path}"
    return {
        "agents": args.agents,
        "load_start": load_start,
        "load_publish": load_publish,
        "load_end": loadavg(),
        "settle_s": settle_s,
        "settled": settled,
        "held_at_publish": held,
        **outcome(agents, published),
        "links": links(before, after, origin1.get(blob_path, 0) - origin0.get(blob_path, 0), size),
        "relays": [
            {
                "name": name,
                "cpu_s_total": c1,
                "cpu_s_after_publish": c1 - c0,
                "peak_rss_kib": hwm,
                "rejected_503": changed(m0, m1, "relay_rejected_total"),
                "requests": changed(m0, m1, "relay_http_requests_total"),
                "closed": changed(m0, m1, "relay_connections_closed_total"),
            }
            for name, c0, c1, hwm, m0, m1 in zip(_names(), cpu0, cpu1, peak, before, after)
        ],
        "probe": [(t - published, b, seconds, status) for t, b, seconds, status in probe.samples],
        "probe_ms_settle": _latencies([x * 1000 for t, _, x, _ in probe.samples if t < published]),
        "probe_ms_update": _latencies([x * 1000 for t, _, x, _ in probe.samples if t >= published]),
        "probe_failed": sum(1 for *_, status in probe.samples if status != 200),
        "rss": [(t - published, kib) for t, kib in sampler.samples],
        "sampler_max_gap_s": sampler.max_gap(),
        "listen_drops": {k: v - drops0.get(k, 0) for k, v in listen_drops().items()},
    }


def _names() -> list[str]:
    return ["top", *(f"branch {b}" for b in range(BRANCHES))]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def outcome(agents: list[dict], published: float) -> dict:
    """The agents' figures: completion after the publish, check-in latencies, errors."""
    done = [(b, at - published) for a in agents for b, at in a["installed"] if at is not None]
    times = sorted(t for _, t in done)
    checkins = [c for a in agents for c in a["checkins"]]
    before = [s * 1000 for start, s, _ in checkins if start < published]
    after = [s * 1000 for start, s, _ in checkins if start >= published]
    slowest = max(checkins, key=lambda c: c[1], default=(published, 0.0, -1))
    errors = _merged(a["errors"] for a in agents)
    busy = _merged(a["busy_503"] for a in agents)
    lags = [(t - published, late) for a in agents for t, late in a["loop_lags"]]
    gaps = sorted(g for a in agents for g in a.get("error_gaps", []))
    return {
        "installed": len(done),
        "timed_out": any(a["timed_out"] for a in agents),
        "errors": errors,
        "error_count": sum(errors.values()),
        "busy_503": sum(busy.values()),
        "busy_503_by_request": busy,
        "agents_cpu_s": [a["cpu_s"] for a in agents],
        "agents_loop_lag_max_s": max((late for _, late in lags), default=0.0),
        "error_gap_s": {"min": gaps[0], "median": gaps[len(gaps) // 2]} if gaps else {},
        "agents_loop_lags_over_1s": sorted((round(t, 1), round(x, 2)) for t, x in lags if x > 1),
        "events_200": sum(a["events_200"] for a in agents),
        "events_204": sum(a["events_204"] for a in agents),
        "downloaded_bytes": sum(a["bytes"] for a in agents),
        "last_s": times[-1] if times else float("inf"),
        "p50_s": pct(times, 0.5) if times else float("inf"),
        "p90_s": pct(times, 0.9) if times else float("inf"),
        "p99_s": pct(times, 0.99) if times else float("inf"),
        "first_s": times[0] if times else float("inf"),
        "completion_by_branch": [
            sorted(t for b, t in done if b == branch) for branch in range(BRANCHES)
        ],
        "checkin_ms_settle": _latencies(before),
        "checkin_ms_update": _latencies(after),
        "slowest_checkin": {
            "start_s": slowest[0] - published,
            "seconds": slowest[1],
            "branch": slowest[2],
        },
    }


def _merged(counters) -> dict[str, int]:
    out: dict[str, int] = {}
    for counter in counters:
        for kind, n in counter.items():
            out[kind] = out.get(kind, 0) + n
    return out


def changed(before: dict[str, float], after: dict[str, float], name: str) -> dict[str, float]:
    """The series of ``name`` that changed, with their increase."""
    out = {}
    for series, value in after.items():
        if series.startswith(name + "{") and value != before.get(series, 0.0):
            out[series.removeprefix(name)] = value - before.get(series, 0.0)
    return out


def _latencies(ms: list[float]) -> dict:
    if not ms:
        return {"count": 0}
    return {
        "count": len(ms),
        "p50": pct(ms, 0.5),
        "p90": pct(ms, 0.9),
        "p99": pct(ms, 0.99),
        "max": max(ms),
    }


def links(before: list[dict], after: list[dict], origin_blob: int, size: int) -> dict:
    """Bytes on each link during the run, as multiples of the blob's size."""

    def delta(i: int, name: str, labels: str = "") -> float:
        return total(after[i], name, labels) - total(before[i], name, labels)

    served = delta(0, "relay_bytes_served_total", 'source="cache"') + delta(
        0, "relay_bytes_served_total", 'source="upstream"'
    )
    return {
        "origin_to_top_blob": origin_blob / size,
        "origin_to_top_all": delta(0, "relay_upstream_bytes_total") / size,
        "top_to_branches_blob": served / size,
        "top_to_branch_all": [
            delta(i, "relay_upstream_bytes_total") / size for i in range(1, BRANCHES + 1)
        ],
        "fills_ok": [delta(i, "relay_fills_total", 'result="ok"') for i in range(BRANCHES + 1)],
    }


# -- summary and plots ---------------------------------------------------------------------


def summarize(runs: list[dict]) -> dict:
    def over(get) -> dict:
        return summary([get(r) for r in runs])

    out = {
        "last_s": over(lambda r: r["last_s"]),
        "p50_s": over(lambda r: r["p50_s"]),
        "p90_s": over(lambda r: r["p90_s"]),
        "p99_s": over(lambda r: r["p99_s"]),
        "installed": over(lambda r: r["installed"]),
        "error_count": over(lambda r: r["error_count"]),
        "busy_503": over(lambda r: r["busy_503"]),
        "settle_s": over(lambda r: r["settle_s"]),
        "sampler_max_gap_s": over(lambda r: r["sampler_max_gap_s"]),
        "origin_to_top_blob": over(lambda r: r["links"]["origin_to_top_blob"]),
        "origin_to_top_all": over(lambda r: r["links"]["origin_to_top_all"]),
        "top_to_branches_blob": over(lambda r: r["links"]["top_to_branches_blob"]),
    }
    for b in range(BRANCHES):
        out[f"top_to_branch{b}_all"] = over(lambda r, b=b: r["links"]["top_to_branch_all"][b])
        out[f"branch{b}_last_s"] = over(lambda r, b=b: r["completion_by_branch"][b][-1])
    for phase in ("settle", "update"):
        for q in ("p50", "p90", "p99", "max"):
            for key in ("checkin", "probe"):
                # Over the runs that sampled the phase (a short update may see no probe).
                values = [r[f"{key}_ms_{phase}"][q] for r in runs if q in r[f"{key}_ms_{phase}"]]
                if values:
                    out[f"{key}_{phase}_{q}_ms"] = summary(values)
    for i, name in enumerate(_names()):
        out[f"{name}/cpu_s_after_publish"] = over(
            lambda r, i=i: r["relays"][i]["cpu_s_after_publish"]
        )
        out[f"{name}/cpu_s_total"] = over(lambda r, i=i: r["relays"][i]["cpu_s_total"])
        out[f"{name}/peak_rss_mib"] = over(lambda r, i=i: r["relays"][i]["peak_rss_kib"] / 1024)
    return out


def plot(run: dict, directory: Path) -> list[Path]:
    import matplotlib as mpl  # noqa: PLC0415 - the bench extra, only here

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    completion = directory / "tree_completion.png"
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    for b, times in enumerate(run["completion_by_branch"]):
        ax.step(times, range(1, len(times) + 1), where="post", label=f"branch {b}")
    ax.set_title(f"{run['agents']:,} agents, 3 branch relays: installed reports after the publish")
    ax.set_xlabel("seconds since the publish at the origin")
    ax.set_ylabel("agents done (cumulative)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(completion, dpi=100)
    plt.close(fig)
    rss = directory / "tree_rss.png"
    fig, (ax, lower) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, constrained_layout=True)
    xs = [t for t, _ in run["rss"]]
    for i, name in enumerate(_names()):
        ax.plot(xs, [kib[i] / 1024 for _, kib in run["rss"]], label=name)
    ax.set_title(f"relay RSS every {SAMPLE_S} s ({run['agents']:,} agents)")
    ax.set_ylabel("RSS, MiB")
    for b in range(BRANCHES):
        points = [(t, x) for t, branch, x, _ in run["probe"] if branch == b]
        lower.plot(
            [t for t, _ in points],
            [x for _, x in points],
            ".-",
            label=f"branch {b}",
            color=f"C{b + 1}",
        )
    lower.set_title(f"one probe check-in every {PROBE_S:.0f} s, turn about on each branch")
    lower.set_ylabel("check-in answer, s")
    lower.set_xlabel("seconds since the publish (negative: start and check-ins)")
    for axis in (ax, lower):
        axis.axvline(0, color="grey", linestyle=":", label="publish")
        axis.grid(alpha=0.3)
        axis.legend()
    fig.savefig(rss, dpi=100)
    plt.close(fig)
    return [completion, rss]


def report(results: dict) -> None:
    """Print the Markdown of RESULTS.md from a saved ``tree_result.json``."""
    s, runs = results["summary"], results["runs"]

    def over(get, fmt: str = ".2f") -> str:
        return spread(summary([get(r) for r in runs]), fmt)

    def row(label: str, cell: str) -> None:
        print(f"| {label} | {cell} |")

    print(f"Machine: {results['machine']}\n")
    for i, run in enumerate(runs, 1):
        print(
            f"- run {i}: 1-minute load average {run['load_start'].split()[0]} at the start, "
            f"{run['load_publish'].split()[0]} at the publish, {run['load_end'].split()[0]} "
            f"at the end; {run['held_at_publish']:,.0f} events requests held at the publish"
        )
    print(f"\n| figure ({len(runs)} runs of {results['agents']:,} agents) | median (min–max) |")
    print("|---|---|")
    row("agents that installed the new version", over(lambda r: r["installed"], ",.0f"))
    row("agents' errors (retried)", over(lambda r: r["error_count"], ",.0f"))
    row("`503` + `Retry-After` answers (waited out)", over(lambda r: r["busy_503"], ",.0f"))
    row("settle: agent processes started → every events request held, s", spread(s["settle_s"]))
    row("**publish → last agent installed, s**", f"**{spread(s['last_s'])}**")
    for q in ("p50", "p90", "p99"):
        row(f"publish → agent installed, {q}, s", spread(s[f"{q}_s"]))
    for b in range(BRANCHES):
        row(f"publish → last agent of branch {b}, s", spread(s[f"branch{b}_last_s"]))
    row(
        "origin → top: the blob's bytes sent by the origin / blob size",
        spread(s["origin_to_top_blob"]),
    )
    row(
        "origin → top: all upstream bytes of the top relay / blob size (its 1 s metadata polls included)",
        spread(s["origin_to_top_all"]),
    )
    row(
        "top → branches: blob bytes the top relay served / blob size (3 branches)",
        spread(s["top_to_branches_blob"]),
    )
    for b in range(BRANCHES):
        row(
            f"top → branch {b}: all upstream bytes / blob size (metadata included)",
            spread(s[f"top_to_branch{b}_all"]),
        )
    for who, key in (("agents", "checkin"), ("probe", "probe")):
        for phase, when in (("settle", "before the publish"), ("update", "after the publish")):
            cells = " / ".join(
                f"{s[f'{key}_{phase}_{q}_ms']['median']:,.0f}"
                if f"{key}_{phase}_{q}_ms" in s
                else "—"
                for q in ("p50", "p90", "p99", "max")
            )
            row(f"check-in latency, {who}, {when}: p50 / p90 / p99 / max, ms (medians)", cells)
    for i, name in enumerate(_names()):
        row(
            f"{name} relay: CPU s after the publish; in all; peak RSS MiB",
            f"{spread(s[f'{name}/cpu_s_after_publish'], '.1f')}; "
            f"{spread(s[f'{name}/cpu_s_total'], '.1f')}; {spread(s[f'{name}/peak_rss_mib'], '.0f')}",
        )
    row("agent processes: CPU s, all four together", over(lambda r: sum(r["agents_cpu_s"]), ".1f"))
    row(
        "agent processes: their longest event-loop lag, s",
        over(lambda r: r["agents_loop_lag_max_s"]),
    )
    if all("listen_drops" in r for r in runs):
        row(
            "the machine's TCP listen-queue overflows during the run",
            over(lambda r: r["listen_drops"].get("ListenOverflows", 0), ",.0f"),
        )
    for i, run in enumerate(runs, 1):
        rejected = {r["name"]: r["rejected_503"] for r in run["relays"] if r["rejected_503"]}
        closed = {r["name"]: r["closed"] for r in run["relays"] if r.get("closed")}
        print(
            f"\nrun {i}: errors {run['errors'] or 'none'}; 503 {rejected or 'none'}; "
            f"connections closed by the guard {closed or 'none'}; seconds from an agent's "
            f"previous answer to its connection error {run.get('error_gap_s') or '-'}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_options(parser)
    parser.add_argument("--agents", type=int, default=AGENTS, help="agents in all (10000)")
    parser.add_argument("--processes", type=int, default=PROCESSES, help="agent processes (4)")
    parser.add_argument(
        "--size", type=parse_size, default=parse_size(SIZE), help=f"blob size ({SIZE})"
    )
    parser.add_argument(
        "--report", type=Path, help="print the Markdown tables of a saved tree_result.json"
    )
    parser.add_argument(
        "--splay",
        type=float,
        default=default_config().events.splay,
        help="the relays' events.splay, s (their default)",
    )
    parser.add_argument("--work", type=Path, default=WORK, help="the runs' files (_work/)")
    parser.add_argument(
        "--out", type=Path, help="tree_result.json and the plots (benchmarks/; --smoke: _work/)"
    )
    parser.add_argument("--no-plot", action="store_true", help="no PNGs (no matplotlib needed)")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"{SMOKE_AGENTS} agents, one run, results and plots under _work/",
    )
    args = parser.parse_args()
    if args.report:
        report(json.loads(args.report.read_text()))
        return
    out_dir = args.out or HERE
    if args.smoke:
        args.agents, args.runs, out_dir = SMOKE_AGENTS, 1, args.out or WORK
    raise_nofile()  # the relays inherit it
    fd_limit = os.sysconf("SC_OPEN_MAX")
    tree = Tree(args.relay_tree[0]) if args.relay_tree else Tree(REPO)
    runs = [run_once(i, args, tree, fd_limit) for i in range(args.runs)]
    median_run = sorted(runs, key=lambda r: r["last_s"])[len(runs) // 2]
    settings = relay_settings(fd_limit, args.splay)
    results = {
        "machine": machine(),
        "relay": tree.describe(),
        "agents": args.agents,
        "processes": args.processes,
        "size": args.size,
        "events": {
            "hold_s": default_config().events.hold,
            "splay_s": args.splay,
        },
        "settings": {"all": settings, "top": TOP_SETTINGS, "branches": BRANCH_SETTINGS},
        "summary": summarize(runs),
        "runs": [
            {k: v for k, v in r.items() if k not in ("rss", "completion_by_branch")} for r in runs
        ],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tree_result.json").write_text(json.dumps(results, indent=1))
    for path in [] if args.no_plot else plot(median_run, out_dir):
        print(f"wrote {path}")
    report(results)


if __name__ == "__main__":
    main()

"""Shared helpers for the benchmarks: a repository, nginx, a relay process, wrk, CPU time."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).parent
WORK = HERE / "_work"
REPO = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
LOAD = [sys.executable, str(HERE / "_load.py")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine() -> str:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    nginx = nginx.removeprefix("nginx version: ")
    wrk_version = "absent"
    if shutil.which("wrk"):
        first = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
        wrk_version = (
            (first.stdout or first.stderr).split()[1] if (first.stdout or first.stderr) else "?"
        )
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()} "
        f"({platform.machine()}), Python {platform.python_version()}, "
        f"aiohttp {metadata.version('aiohttp')}, {nginx}, wrk {wrk_version}"
    )


def loadavg() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def summary(values: list[float]) -> dict:
    """Median, min and max of one figure over the runs."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
    }


def spread(s: dict, fmt: str = ".2f") -> str:
    """``median (min–max)`` of a :func:`summary`."""
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"


class Tree:
    """A checkout of the relay whose server is measured, with its own venv.

    The load generators, origins and nginx always run from this checkout; only the relay
    process comes from the tree, so two commits are measured against the same harness.
    """

    def __init__(self, path: Path, event_loop: str | None = None, workers: int = 1) -> None:
        self.path = path.resolve()
        self.event_loop = event_loop
        self.workers = workers
        venv = self.path / ".venv" / "bin" / "python"
        self.python = str(venv) if venv.exists() else sys.executable
        # The CLI became a package (relay/cli/main.py); older trees run relay/cli.py.
        self.module = (
            "relay.cli.main" if (self.path / "relay/cli/main.py").exists() else "relay.cli"
        )
        self.commit = (
            subprocess.run(
                ["git", "-C", str(self.path), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
            or self.path.name
        )
        self.label = (
            f"relay@{self.commit}"
            + (f"+{event_loop}" if event_loop else "")
            + (f"+w{workers}" if workers != 1 else "")
        )
        # The relay's own settings for this variant, as RELAY_<SECTION>__<KEY> variables;
        # relay.workers always (its default is one process per core).
        self.env = {"RELAY_RELAY__WORKERS": str(workers)}
        if event_loop:
            self.env["RELAY_RELAY__EVENT_LOOP"] = event_loop
        self.aiohttp = subprocess.run(
            [self.python, "-c", "import aiohttp; print(aiohttp.__version__)"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()

    def describe(self) -> dict:
        return {
            "path": str(self.path),
            "commit": self.commit,
            "label": self.label,
            "env": self.env,
            "python": self.python,
            "aiohttp": self.aiohttp,
        }


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / CLK_TCK


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live children (nginx's workers, a relay's workers)."""
    total = cpu_seconds(pid)
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                total += cpu_seconds(int(child))
            except FileNotFoundError:  # exited meanwhile: its CPU is in cutime now
                pass
    return total


@contextmanager
def nginx(
    root: Path,
    port: int,
    workers: int = 1,
    proxy_to: str | None = None,
    proxy_rate: int | None = None,
    cache_dir: Path | None = None,
):
    """Run nginx serving ``root`` (or proxying with a cache and proxy_cache_lock)."""
    WORK.mkdir(exist_ok=True)  # a fresh checkout has none (it is not tracked)
    conf_dir = Path(tempfile.mkdtemp(prefix="nginx-", dir=WORK))
    if proxy_to:
        assert cache_dir is not None
        cache_dir.mkdir(parents=True, exist_ok=True)
        location = f"""
        proxy_cache_path {cache_dir} levels=1:2 keys_zone=relay:10m max_size=10g inactive=1h use_temp_path=off;
        server {{
            listen 127.0.0.1:{port} reuseport backlog=4096;
            location / {{
                proxy_pass {proxy_to};
                proxy_cache relay;
                proxy_cache_valid 200 1h;
                proxy_cache_lock on;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
            }}
        }}"""
    else:
        location = f"""
        server {{
            listen 127.0.0.1:{port} reuseport backlog=4096;
            root {root};
            location / {{ }}
        }}"""
    conf = conf_dir / "nginx.conf"
    conf.write_text(f"""
worker_processes {workers};
pid {conf_dir}/nginx.pid;
error_log {conf_dir}/error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    client_body_temp_path {conf_dir}/body;
    proxy_temp_path {conf_dir}/proxy;
    fastcgi_temp_path {conf_dir}/fastcgi;
    uwsgi_temp_path {conf_dir}/uwsgi;
    scgi_temp_path {conf_dir}/scgi;
    default_type application/octet-stream;
    {location}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(conf_dir)])
    wait_http(f"http://127.0.0.1:{port}/", ok=(200, 403, 404, 502))
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGQUIT)
        proc.wait(10)
        shutil.rmtree(conf_dir, ignore_errors=True)


def wait_http(url: str, ok=(200,), timeout: float = 30, proc=None) -> None:
    """Wait until ``url`` answers a status in ``ok``; fail at once if ``proc`` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode}) before answering")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status in ok:
                    return
        except urllib.error.HTTPError as e:
            if e.code in ok:
                return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


@contextmanager
def origin(public: Path, rate: int):
    """``_load.py origin``: a static origin of ``public``, output limited to ``rate`` B/s (0: none).

    Yields its base URL; :func:`stats` reads the body bytes it sent per path.
    """
    port = free_port()
    proc = subprocess.Popen([*LOAD, "origin", str(public), str(port), str(rate)])
    try:
        wait_http(f"http://127.0.0.1:{port}/_stats")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def stats(base: str) -> dict:
    """Body bytes an :func:`origin` sent so far, per path."""
    with urllib.request.urlopen(f"{base}/_stats") as r:
        return json.loads(r.read())


@contextmanager
def relay_process(
    upstream: str,
    root_file: Path,
    data_dir: Path,
    port: int,
    env=None,
    tree: Tree | None = None,
    log: Path | None = None,
):
    """A relay in its own process (access log off), from ``tree`` (default: this one).

    One process unless ``tree.workers`` (``relay.workers``) says otherwise. Its output goes to
    ``log`` when given (else nowhere).
    """
    tree = tree or Tree(REPO)
    # wrk's 64 connections come from one address without Relay-Agent-Id: as one agent.
    environ = {
        **os.environ,
        "RELAY_RELAY__ACCESS_LOG": "false",
        "RELAY_LIMITS__MAX_TRANSFERS_PER_AGENT": "0",
        **tree.env,
        **(env or {}),
    }
    proc = subprocess.Popen(
        [
            tree.python,
            "-m",
            tree.module,
            "serve",
            "--upstream",
            upstream,
            "--trusted-root",
            str(root_file),
            "--data-dir",
            str(data_dir),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        env=environ,
        cwd=tree.path,
        stdout=subprocess.DEVNULL,
        stderr=(out := log.open("ab") if log else None) or subprocess.DEVNULL,
    )
    try:
        # A loaded 2-core machine can take a while to start a relay and sync it.
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=120, proc=proc)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        if out:
            out.close()


_UNITS = {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}


def wrk(url: str, connections: int = 64, seconds: int = 10, threads: int = 2) -> dict:
    out = subprocess.run(
        ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", out)
    bps = float(m.group(1)) * _UNITS[m.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    return {
        "rps": rps,
        "bytes_per_s": bps,
        "non_2xx": int(errors.group(1)) if errors else 0,
        "p99": f"{p99.group(1)}{p99.group(2)}" if p99 else "?",
        "raw": out,
    }


def save(name: str, data: dict) -> None:
    WORK.mkdir(exist_ok=True)
    (WORK / f"{name}.json").write_text(json.dumps(data, indent=2))


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """``--runs``, ``--relay-tree``, ``--event-loop`` and ``--workers``, shared by the
    benchmarks that compare checkouts (see :func:`trees_of`)."""
    parser.add_argument(
        "--runs", type=int, default=3, help="runs; medians and min–max over them (3)"
    )
    parser.add_argument(
        "--relay-tree",
        type=Path,
        action="append",
        help="checkout whose relay is measured, with its venv in DIR/.venv (repeatable; default: this one)",
    )
    parser.add_argument(
        "--event-loop",
        choices=("asyncio", "uvloop", "auto"),
        action="append",
        help="relay.event_loop of the relay measured (repeatable: each tree is measured "
        "with each loop in the same run; default: the tree's own default)",
    )

    parser.add_argument(
        "--workers",
        type=int,
        action="append",
        help="relay.workers of the relay measured (repeatable, as --event-loop; default 1)",
    )


def trees_of(args: argparse.Namespace) -> list[Tree]:
    """The relays to measure: every ``--relay-tree`` with every ``--event-loop`` and
    every ``--workers``."""
    paths = args.relay_tree or [REPO]
    loops = args.event_loop or [None]
    workers = args.workers or [1]
    return [Tree(path, loop, n) for path in paths for loop in loops for n in workers]

"""Delta sizes and costs on real consecutive releases, relay formats beside the CLI tools.

Inputs (fetched into benchmarks/_work/delta, then reused):
  * the uncompressed native libraries inside consecutive patch releases of PyPI wheels
    (`pip download --no-deps --only-binary=:all:`), diffed old -> new, same file name;
  * a signature-database-like text file (hex digests and names, ~26 MB) and its next
    version with ~1 % of lines changed or added.
For each pair: patch size as % of the new file, diff time and peak memory, apply time and
peak memory (each diff and each apply in a fresh process; peak = its ru_maxrss); for bsdiff4
and zstd as the relay makes them (`relay.deltas.formats.make_patch`, applied with
`relay.deltas.apply.apply_patch_file`, the agent's path), zstd also at level 19, beside
`zstd -3 --long=N --patch-from` and `xdelta3 -9`. Then the event loop's worst stall while the
relay's DeltaEngine diffs the largest pair.

Tools: /usr/bin/zstd and xdelta3 are Debian packages: `apt-get install -y zstd xdelta3`.
pip (for the wheels) comes with the venv; PyPI must be reachable on the first run.

Each run measures every pair; the median and spread (min–max) over ``--runs`` are printed
and saved. ``--append`` adds the runs to those saved before, so two checkouts can be run
turn about, each with its own ``benchmarks/_work``.

Run:  python benchmarks/delta_bench.py [--runs 3] [--append]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent))

from benchmarks._common import WORK, loadavg, machine, save, spread, summary  # noqa: E402
from relay.core.protocol import DeltaFormat  # noqa: E402
from relay.deltas.apply import apply_patch_file  # noqa: E402
from relay.deltas.engine import DeltaBudget, DeltaEngine, DeltaOutcome  # noqa: E402
from relay.deltas.formats import make_patch  # noqa: E402

DIR = WORK / "delta"
LEVEL = 3  # the relay's default (delta.zstd_level)
HIGH_LEVEL = 19  # measured beside it
# (package, old version, new version, library file name inside the wheel)
RELEASES = [
    ("pydantic-core", "2.27.1", "2.27.2", "_pydantic_core"),
    ("orjson", "3.10.14", "3.10.15", "orjson"),
    ("numpy", "2.1.2", "2.1.3", "_multiarray_umath"),
]


def fetch_library(package: str, version: str, stem: str) -> Path:
    dest = DIR / f"{package}-{version}.so"
    if dest.exists():
        return dest
    wheels = DIR / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.11",
            "--platform",
            "manylinux2014_x86_64",
            "-d",
            str(wheels),
            f"{package}=={version}",
        ],
        check=True,
    )
    wheel = next(
        w
        for w in wheels.glob("*.whl")
        if w.name.lower().replace("_", "-").startswith(f"{package.lower()}-{version}-")
    )
    with zipfile.ZipFile(wheel) as z:
        name = max(
            (n for n in z.namelist() if Path(n).name.startswith(stem) and ".so" in n),
            key=lambda n: z.getinfo(n).file_size,
        )
        dest.write_bytes(z.read(name))
    return dest


def signature_db() -> tuple[Path, Path]:
    old, new = DIR / "sigs-1.txt", DIR / "sigs-2.txt"
    if old.exists() and new.exists():
        return old, new
    rng = random.Random(7)
    families = ["Trojan", "Worm", "Adware", "Backdoor", "Ransom", "Exploit", "PUA", "Spyware"]
    lines = []
    for i in range(330_000):
        digest = rng.randbytes(32).hex()
        lines.append(
            f"{digest}:{rng.randrange(10**6, 10**8)}:{rng.choice(families)}.Win32.Gen-{i:07d}\n"
        )
    old.write_text("".join(lines))
    for _ in range(len(lines) // 200):  # 0.5 % changed
        at = rng.randrange(len(lines))
        lines[at] = (
            f"{rng.randbytes(32).hex()}:{rng.randrange(10**6, 10**8)}:{rng.choice(families)}.Win32.Upd-{at:07d}\n"
        )
    for i in range(len(lines) // 200):  # 0.5 % added
        lines.insert(rng.randrange(len(lines)), f"{rng.randbytes(32).hex()}:1:New.Gen-{i:07d}\n")
    new.write_text("".join(lines))
    return old, new


def worker(mode: str, fmt: str, old: Path, new: Path, patch: Path, level: int) -> None:
    """Run in a fresh process: diff or apply once, print seconds and peak RSS."""
    if mode == "diff":
        o, n = old.read_bytes(), new.read_bytes()
        t0 = time.perf_counter()
        patch.write_bytes(make_patch(o, n, DeltaFormat(fmt), level))
    else:
        # The agent's path: signed length and sha256 known, the patch and the old file
        # on disk, the output streamed into a file.
        with new.open("rb") as f:  # streamed: the new file is not held in this process
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        size = new.stat().st_size
        t0 = time.perf_counter()
        apply_patch_file(
            old,
            patch,
            DIR / "out.relay",
            fmt=DeltaFormat(fmt),
            expected_length=size,
            expected_sha256=digest,
        )
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "seconds": seconds,
                "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            }
        )
    )


def run_worker(mode: str, fmt: str, old: Path, new: Path, patch: Path, level: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--worker",
            mode,
            fmt,
            str(old),
            str(new),
            str(patch),
            str(level),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return json.loads(out)


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a command, via /usr/bin/time when present."""
    if shutil.which("time") or Path("/usr/bin/time").exists():
        r = subprocess.run(
            ["/usr/bin/time", "-f", "%e %M", *cmd], capture_output=True, text=True, check=True
        )
        secs, kb = r.stderr.strip().splitlines()[-1].split()
        return float(secs), int(kb) * 1024
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0, 0


def long_flag(old: Path, new: Path) -> str:
    size = max(old.stat().st_size, new.stat().st_size)
    return f"--long={max(10, min(31, size.bit_length() + 1))}"


def measure_pair(name: str, old: Path, new: Path) -> dict:
    size = new.stat().st_size
    row: dict = {"name": name, "old_bytes": old.stat().st_size, "new_bytes": size}
    for tool, fmt, level in (
        ("bsdiff4", "bsdiff4", 0),
        ("zstd", "zstd", LEVEL),
        (f"zstd-{HIGH_LEVEL}", "zstd", HIGH_LEVEL),
    ):
        patch = DIR / f"{name}.{tool}"
        d = run_worker("diff", fmt, old, new, patch, level)
        a = run_worker("apply", fmt, old, new, patch, level)
        row[tool] = {
            "pct": 100 * patch.stat().st_size / size,
            "diff_s": d["seconds"],
            "diff_peak_mb": d["maxrss"] / 2**20,
            "apply_s": a["seconds"],
            "apply_peak_mb": a["maxrss"] / 2**20,
        }
    zp = DIR / f"{name}.zstdcli"
    lf = long_flag(old, new)
    secs, rss = timed(
        ["zstd", "-q", "-f", f"-{LEVEL}", lf, f"--patch-from={old}", str(new), "-o", str(zp)]
    )
    asecs, arss = timed(
        ["zstd", "-q", "-f", "-d", lf, f"--patch-from={old}", str(zp), "-o", str(DIR / "out.zstd")]
    )
    row["zstd-cli"] = {
        "pct": 100 * zp.stat().st_size / size,
        "diff_s": secs,
        "diff_peak_mb": rss / 2**20,
        "apply_s": asecs,
        "apply_peak_mb": arss / 2**20,
    }
    if shutil.which("xdelta3"):
        xp = DIR / f"{name}.xdelta3"
        secs, rss = timed(["xdelta3", "-f", "-9", "-e", "-s", str(old), str(new), str(xp)])
        asecs, arss = timed(["xdelta3", "-f", "-d", "-s", str(old), str(xp), str(DIR / "out.xd")])
        row["xdelta3"] = {
            "pct": 100 * xp.stat().st_size / size,
            "diff_s": secs,
            "diff_peak_mb": rss / 2**20,
            "apply_s": asecs,
            "apply_peak_mb": arss / 2**20,
        }
    else:
        print("xdelta3 not found: apt-get install -y xdelta3 (row left out)")
    return row


async def loop_stall(
    old: Path, new: Path, fmt: DeltaFormat | None, seconds: float = 0
) -> tuple[float, float]:
    """Worst gap of a 10 ms ticker while the relay's engine diffs (old, new).

    With ``fmt`` None, the same ticker runs ``seconds`` with nothing else on the loop: the
    baseline that the machine's own scheduling delays give (on a loaded machine they,
    not the engine, can be the largest gap).
    """
    loop = asyncio.get_running_loop()
    gaps: list[float] = []

    async def ticker() -> None:
        last = loop.time()
        while True:
            await asyncio.sleep(0.01)
            now = loop.time()
            gaps.append(now - last - 0.01)
            last = now

    data = await asyncio.to_thread(new.read_bytes)
    digest = await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())
    t = asyncio.create_task(ticker())
    t0 = loop.time()
    if fmt is None:
        await asyncio.sleep(seconds)
    else:
        engine = DeltaEngine(
            workers=1,
            budget=DeltaBudget(max_memory=2**40, max_seconds=600, max_ratio=1.0, zstd_level=LEVEL),
        )
        result = await engine.compute(
            old,
            new,
            fmt=fmt,
            new_sha256=digest,
            new_length=len(data),
            dest=DIR / f"stall.{fmt}",
        )
        assert result.outcome is DeltaOutcome.COMPUTED, result
    took = loop.time() - t0
    t.cancel()
    return max(gaps), took


TOOLS = ("bsdiff4", "zstd", f"zstd-{HIGH_LEVEL}", "zstd-cli", "xdelta3")
FIGURES = ("pct", "diff_s", "diff_peak_mb", "apply_s", "apply_peak_mb")


def input_pairs() -> list[tuple[str, Path, Path]]:
    pairs = []
    for package, v1, v2, stem in RELEASES:
        try:
            pairs.append(
                (
                    f"{package} {v1}->{v2}",
                    fetch_library(package, v1, stem),
                    fetch_library(package, v2, stem),
                )
            )
        except (subprocess.CalledProcessError, StopIteration, ValueError) as e:
            print(f"skipping {package}: {e}")
    s1, s2 = signature_db()
    pairs.append(("signature db text", s1, s2))
    return pairs


def one_run(pairs: list[tuple[str, Path, Path]]) -> dict:
    load_start = loadavg()
    rows = [
        measure_pair(name.replace(" ", "_").replace(">", ""), old, new) | {"label": name}
        for name, old, new in pairs
    ]
    largest = max(pairs, key=lambda p: p[2].stat().st_size)
    stalls = {}
    for fmt in DeltaFormat:
        stall, took = asyncio.run(loop_stall(largest[1], largest[2], fmt))
        stalls[str(fmt)] = {"worst_stall_ms": stall * 1000, "diff_s": took, "pair": largest[0]}
    idle_for = stalls[str(DeltaFormat.BSDIFF4)]["diff_s"]
    stall, took = asyncio.run(loop_stall(largest[1], largest[2], None, idle_for))
    stalls["idle"] = {"worst_stall_ms": stall * 1000, "diff_s": took, "pair": "nothing (baseline)"}
    return {"load_start": load_start, "load_end": loadavg(), "rows": rows, "stalls": stalls}


def summarize(runs: list[dict]) -> dict:
    rows = []
    for i, first in enumerate(runs[0]["rows"]):
        row = {"label": first["label"], "new_bytes": first["new_bytes"]}
        for tool in TOOLS:
            if tool in first:
                row[tool] = {f: summary([run["rows"][i][tool][f] for run in runs]) for f in FIGURES}
        rows.append(row)
    stalls = {
        fmt: {
            "pair": s["pair"],
            "worst_stall_ms": summary([run["stalls"][fmt]["worst_stall_ms"] for run in runs]),
            "diff_s": summary([run["stalls"][fmt]["diff_s"] for run in runs]),
        }
        for fmt, s in runs[0]["stalls"].items()
    }
    bs = [r["bsdiff4"] for r in rows]
    zs = [r["zstd"] for r in rows]
    med_size_ratio = statistics.median(
        z["pct"]["median"] / b["pct"]["median"] for z, b in zip(zs, bs)
    )
    med_speed = statistics.median(
        b["diff_s"]["median"] / z["diff_s"]["median"] for z, b in zip(zs, bs)
    )
    zstd_first = med_size_ratio <= 1.25 and med_speed >= 10
    return {
        "rows": rows,
        "stalls": stalls,
        "median_zstd_over_bsdiff_size": med_size_ratio,
        "median_bsdiff_over_zstd_time": med_speed,
        "default_order": ["zstd", "bsdiff4"] if zstd_first else ["bsdiff4", "zstd"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    parser.add_argument(
        "--runs", type=int, default=3, help="runs; medians and min–max over them (3)"
    )
    parser.add_argument(
        "--append",
        action="store_true",
        help="add these runs to the ones saved in benchmarks/_work/delta.json (to alternate with "
        "another checkout run by run)",
    )
    args = parser.parse_args()
    if args.worker:
        mode, fmt, old, new, patch, level = args.worker
        worker(mode, fmt, Path(old), Path(new), Path(patch), int(level))
        return
    DIR.mkdir(parents=True, exist_ok=True)
    pairs = input_pairs()
    saved = WORK / "delta.json"
    runs = json.loads(saved.read_text()).get("runs", []) if args.append and saved.exists() else []
    for i in range(args.runs):
        runs.append(one_run(pairs))
        print(
            f"run {i + 1}/{args.runs} done, load average {runs[-1]['load_start']} -> {runs[-1]['load_end']}"
        )
    results = {"machine": machine(), "runs": runs, "summary": summarize(runs)}
    save("delta", results)
    report(results)


def report(results: dict) -> None:
    s = results["summary"]
    print(f"machine: {results['machine']}")
    for i, run in enumerate(results["runs"], 1):
        print(
            f"run {i}: load average (1, 5, 15 min) {run['load_start']} at start, {run['load_end']} at end"
        )
    print(f"median (min–max) over {len(results['runs'])} runs")
    print(
        f"{'pair':<30}{'tool':<10}{'new MB':>7}{'patch %':>9}{'diff s':>20}{'peak MB':>16}"
        f"{'apply s':>20}{'peak MB':>16}"
    )
    for r in s["rows"]:
        for tool in TOOLS:
            if tool in r:
                m = r[tool]
                print(
                    f"{r['label']:<30}{tool:<10}{r['new_bytes'] / 1e6:>7.1f}{m['pct']['median']:>9.2f}"
                    f"{spread(m['diff_s']):>20}{spread(m['diff_peak_mb'], '.0f'):>16}"
                    f"{spread(m['apply_s']):>20}{spread(m['apply_peak_mb'], '.0f'):>16}"
                )
    for fmt, st in s["stalls"].items():
        doing = (
            "nothing else runs (baseline)"
            if fmt == "idle"
            else f"the engine diffs {st['pair']} with {fmt}"
        )
        print(
            f"event loop worst stall while {doing}: "
            f"{spread(st['worst_stall_ms'], '.1f')} ms (for {spread(st['diff_s'], '.1f')} s)"
        )
    print(
        f"median zstd/bsdiff4 patch size: {s['median_zstd_over_bsdiff_size']:.2f}x; "
        f"median bsdiff4/zstd diff time: {s['median_bsdiff_over_zstd_time']:.1f}x"
    )
    print(f"default order: {s['default_order']}")


if __name__ == "__main__":
    main()

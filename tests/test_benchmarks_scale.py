"""The scale benchmark runs end to end on a small fleet and reports every phase."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "scale_bench.py"
AGENTS = 50


def run_bench(work: Path, out: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--runs",
            "1",
            "--agents",
            str(AGENTS),
            "--blob-kib",
            "64",
            "--work",
            str(work / "run"),
            "--json",
            str(out),
        ],
        check=True,
        timeout=280,
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_scale_bench_small_fleet(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    # nginx's workers (the origin) run as "nobody" when started as root: the repository
    # must be readable by them, which pytest's private temporary directory is not.
    work = Path(tempfile.mkdtemp(prefix="relay-scale-"))
    work.chmod(0o755)
    try:
        run_bench(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results = json.loads(out.read_text())
    run = results["runs"][0]
    assert run["registered"] == AGENTS
    assert run["populate"]["statuses"] == {"200": AGENTS}
    assert run["checkin"]["statuses"] == {"200": AGENTS}
    assert len(run["populate"]["latencies_ms"]) == AGENTS
    # Every evicted version is filled again and served whole, each fill evicting another.
    assert run["fills"]["ok"] == run["fills"]["blobs"] > 0
    assert run["fills"]["evictions_by_fills"] > 0
    assert run["listing"]["agents"] == AGENTS
    assert run["metrics"]["statuses"] == [200]
    assert set(run["stalls"]) == {
        "idle",
        "populate",
        "sync",
        "fill",
        "scrub",
        "metrics",
        "listing",
        "checkin",
    }
    assert run["restart"]["ready_seconds"] > 0
    assert run["empty_start"]["ready_seconds"] > 0
    assert results["summary"]["rss_per_agent"]["runs"] == 1

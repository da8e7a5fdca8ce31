"""The relay-tree benchmark runs end to end on a few agents and reports every link."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "tree_bench.py"
AGENTS = 6
SIZE = 64 * 1024


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tree_bench_small_fleet(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--runs",
            "1",
            "--agents",
            str(AGENTS),
            "--processes",
            "2",
            "--size",
            str(SIZE),
            "--splay",
            "1",
            "--no-plot",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(tmp_path),
        ],
        check=True,
        timeout=280,
        stdout=subprocess.DEVNULL,
    )
    results = json.loads((tmp_path / "tree_result.json").read_text())
    run = results["runs"][0]
    assert run["installed"] == AGENTS
    assert run["error_count"] == 0
    assert run["held_at_publish"] == AGENTS
    # Each link carried the new blob once: origin -> top, top -> each of the three branches.
    assert run["links"]["origin_to_top_blob"] == 1.0
    assert run["links"]["top_to_branches_blob"] == 3.0
    assert run["links"]["fills_ok"] == [1.0, 1.0, 1.0, 1.0]
    assert results["settings"]["all"]["RELAY_RELAY__WORKERS"] == "1"
    assert results["summary"]["last_s"]["runs"] == 1

"""`relay demo` end to end: origin, relay and agents on loopback, summary from real counters."""

from __future__ import annotations

import io
import re

import pytest

from relay.cli.demo import run_demo


@pytest.mark.timeout(240)
async def test_demo_updates_every_agent_through_deltas():
    out = io.StringIO()
    assert await run_demo(agents=4, out=out) == 0, out.getvalue()
    text = out.getvalue()
    assert "agents updated to 1.0.2:     4/4" in text
    origin_x = float(re.search(r"bytes from the origin: +[\d.,]+ MB +\(([\d.]+)x", text).group(1))
    assert origin_x <= 3.05  # each of the three versions crossed the WAN once (N = 4 agents)
    delta = re.search(r"served as deltas: +([\d.,]+) MB instead of ([\d.,]+) MB", text)
    assert float(delta.group(1)) > 0 and float(delta.group(2)) > 0

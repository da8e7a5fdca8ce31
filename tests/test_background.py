"""Background loops are supervised: a failing loop is logged, counted, restarted and shown."""

from __future__ import annotations

import asyncio
import logging

from relay.metrics import RelayMetrics
from relay.server.state import Background


def _failures(metrics: RelayMetrics, task: str) -> float:
    value = metrics.registry.get_sample_value("relay_background_failures_total", {"task": task})
    return value or 0.0


async def test_a_failing_loop_is_restarted_counted_and_shown(caplog):
    metrics = RelayMetrics()
    bg = Background(metrics)
    bg.HEALTHY_AFTER = 0.2
    runs = 0
    healthy = asyncio.Event()

    async def loop() -> None:
        nonlocal runs
        runs += 1
        if runs <= 2:
            raise OSError(28, "No space left on device")
        healthy.set()
        await asyncio.sleep(3600)

    caplog.set_level(logging.ERROR)
    bg.supervise("sync", loop)
    await asyncio.wait_for(healthy.wait(), timeout=10)
    assert runs == 3
    assert _failures(metrics, "sync") == 2
    assert "sync" in bg.failing()
    assert "No space left on device" in bg.failing()["sync"].last_error
    assert any("background loop sync failed" in r.message and r.exc_info for r in caplog.records)
    for _ in range(100):  # healthy again once it ran HEALTHY_AFTER without failing
        if not bg.failing():
            break
        await asyncio.sleep(0.05)
    assert not bg.failing()
    await bg.close()
    assert not bg.running()


async def test_a_one_shot_failure_is_logged_and_shutdown_errors_are_not_swallowed(caplog):
    bg = Background(RelayMetrics())
    caplog.set_level(logging.ERROR)

    async def broken() -> None:
        raise ValueError("boom")

    async def stubborn() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RuntimeError("failed while stopping") from None

    bg.spawn(broken(), "prefetch")
    bg.spawn(stubborn(), "deltas")
    await asyncio.sleep(0.05)
    assert any("prefetch failed" in r.message for r in caplog.records)
    await bg.close()
    assert any(r.exc_info and "failed while stopping" in str(r.exc_info[1]) for r in caplog.records)

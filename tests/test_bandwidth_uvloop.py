"""The limiter on uvloop (``relay.event_loop``'s default): a timer armed for a time already
past is a plain ``Handle`` there (no ``when()``), while shares and rates change under it."""

from __future__ import annotations

import asyncio
import random

import uvloop

from relay.transfer.bandwidth import BandwidthLimiter


async def _paced_with_changing_shares() -> int:
    limiter = BandwidthLimiter(400_000, 0, max_chunk=4096)
    granted = 0
    done = asyncio.Event()

    async def agent(name: str) -> None:
        nonlocal granted
        for _ in range(40):
            await limiter.acquire(name, 4096)
            granted += 4096

    async def shares() -> None:  # as EgressShare does, only much more often
        rng = random.Random(7)
        while not done.is_set():
            limiter.set_share(rng.choice([0.02, 0.5, 0.98, 1.0]))
            await asyncio.sleep(0)

    changer = asyncio.create_task(shares())
    try:
        async with asyncio.timeout(30):  # a pump that failed leaves waiters waiting forever
            await asyncio.gather(*(agent(f"a{i}") for i in range(8)))
    finally:
        done.set()
        await changer  # raises what a pump raised
    return granted


def test_paced_transfers_survive_share_changes_on_uvloop():
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(_paced_with_changing_shares()) == 8 * 40 * 4096

"""Single flight: concurrent callers for one key share one run of the work."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class SingleFlight(Generic[K, T]):
    """At most one run of the work per key at a time; later callers await its result."""

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Future[T]] = {}

    async def run(self, key: K, work: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """Run ``work()`` for ``key``, or wait for the run already going.

        Returns:
            The result, and whether this caller ran the work (``False``: it shared
            another caller's run).

        Raises:
            BaseException: whatever the work raised, to every caller that shared it.
        """
        running = self._running.get(key)
        if running is not None:
            return await asyncio.shield(running), False
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._running[key] = future
        try:
            result = await work()
        except BaseException as e:
            future.set_exception(e)
            future.exception()  # retrieved: the sharing callers re-raise it themselves
            raise
        finally:
            del self._running[key]
        future.set_result(result)
        return result, True

"""A small typed wrapper over diskcache (embedded SQLite) for JSON values.

diskcache has no type information; this module is the only one that imports it.
Its calls block (SQLite), so the async methods run them in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache

from relay.errors import StateUnavailableError

JSON = Any


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    try:
        yield
    except (sqlite3.Error, OSError) as e:
        raise StateUnavailableError(f"state database: {what}: {e}") from e


class KV:
    """A persistent map of ``str`` to JSON values, plus an append-only log.

    Args:
        directory: where the SQLite files live (``<data_dir>/state``).
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._cache = diskcache.Cache(str(directory), eviction_policy="none", size_limit=2**40)
        self._log = diskcache.Deque(directory=str(directory / "log"))

    # -- blocking API (call from threads) --------------------------------------

    def get_sync(self, key: str, default: JSON = None) -> JSON:
        """Return the value of ``key`` or ``default``."""
        raw = self._cache.get(key)
        return default if raw is None else json.loads(raw)

    def set_sync(self, key: str, value: JSON) -> None:
        """Store ``value`` under ``key`` (durably, in one transaction).

        Raises:
            StateUnavailableError: the write failed (disk full, I/O error); nothing changed.
        """
        with _unavailable(f"cannot save {key}"):
            self._cache.set(key, json.dumps(value, separators=(",", ":")))

    def delete_sync(self, key: str) -> None:
        """Delete ``key`` if present."""
        self._cache.delete(key)

    def items_sync(self, prefix: str) -> Iterator[tuple[str, JSON]]:
        """Yield ``(key, value)`` for keys starting with ``prefix``."""
        for key in list(self._cache.iterkeys()):
            if isinstance(key, str) and key.startswith(prefix):
                raw = self._cache.get(key)
                if raw is not None:
                    yield key, json.loads(raw)

    def append_log_sync(self, entry: JSON, max_entries: int = 100_000) -> None:
        """Append to the log, dropping the oldest past ``max_entries``.

        Raises:
            StateUnavailableError: the write failed (disk full, I/O error).
        """
        with _unavailable("cannot append to the audit log"):
            self._log.append(json.dumps(entry, separators=(",", ":")))
        while len(self._log) > max_entries:
            self._log.popleft()

    def log_sync(self, limit: int = 1000) -> list[JSON]:
        """The newest ``limit`` log entries, oldest first."""
        n = len(self._log)
        start = max(0, n - limit)
        return [json.loads(self._log[i]) for i in range(start, n)]

    # -- async API ---------------------------------------------------------------

    async def get(self, key: str, default: JSON = None) -> JSON:
        """Async :meth:`get_sync`."""
        return await asyncio.to_thread(self.get_sync, key, default)

    async def set(self, key: str, value: JSON) -> None:
        """Async :meth:`set_sync`."""
        await asyncio.to_thread(self.set_sync, key, value)

    async def items(self, prefix: str) -> list[tuple[str, JSON]]:
        """Async :meth:`items_sync`."""
        return await asyncio.to_thread(lambda: list(self.items_sync(prefix)))

    async def append_log(self, entry: JSON) -> None:
        """Async :meth:`append_log_sync`."""
        await asyncio.to_thread(self.append_log_sync, entry)

    async def log(self, limit: int = 1000) -> list[JSON]:
        """Async :meth:`log_sync`."""
        return await asyncio.to_thread(self.log_sync, limit)

    def close(self) -> None:
        """Close the SQLite connections."""
        self._cache.close()

"""A small typed wrapper over diskcache (embedded SQLite) for JSON values.

diskcache has no type information; this module is the only one that imports it.
Its calls block (SQLite), so the async methods run them in a thread.

A damaged database does not stop the relay: :meth:`KV.open` checks it first
(:func:`check_state`: SQLite's ``quick_check`` of both files, and an empty or
missing database where the data directory shows earlier use, which would
silently reset every approval). A damaged store reads as empty and refuses every
write with :class:`relay.errors.StateUnavailableError` naming the problem, until
:func:`repair_state` (``relay state check --repair``) moves it aside.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diskcache

from relay.errors import StateDamagedError, StateUnavailableError

JSON = Any


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    try:
        yield
    except (sqlite3.Error, OSError) as e:
        raise StateUnavailableError(f"state database: {what}: {e}") from e


_DB_FILES = ("cache.db", "log/cache.db")  # diskcache's Cache, and the Deque of the log


def shows_earlier_use(*directories: Path) -> bool:
    """Whether any of ``directories`` holds a file (the relay ran with this data before)."""
    for directory in directories:
        if directory.is_dir() and any(p.is_file() for p in directory.rglob("*")):
            return True
    return False


def check_state(directory: Path, *, used: bool) -> str | None:
    """What is wrong with the state database in ``directory``; ``None`` when it is sound.

    Args:
        directory: ``<data_dir>/state``.
        used: the data directory shows earlier use (:func:`shows_earlier_use` of the
            metadata and blobs): then a missing or empty database is damage, not a
            first start.

    Blocking (SQLite reads the whole database): call it from a thread.
    """
    main = directory / _DB_FILES[0]
    if not main.exists() or main.stat().st_size == 0:
        if used:
            what = "missing" if not main.exists() else "empty (0 bytes)"
            return f"{main} is {what} although the data directory was used before"
        return None
    for name in _DB_FILES:
        path = directory / name
        if not path.exists():
            continue
        try:
            with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
                rows = db.execute("PRAGMA quick_check").fetchall()
                db.execute("SELECT count(*) FROM Cache").fetchone()
        except sqlite3.Error as e:
            return f"{path} cannot be read: {e}"
        if rows != [("ok",)]:
            return f"{path} is damaged: {'; '.join(str(r[0]) for r in rows[:3])}"
    return None


def repair_state(directory: Path, now: float) -> Path:
    """Move the state database aside and start an empty one; return where it went.

    Raises:
        OSError: it cannot be moved or the new one cannot be made.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    aside = directory.with_name(f"{directory.name}.damaged-{stamp}")
    if directory.exists():
        directory.rename(aside)
    KV(directory).close()
    return aside


class KV:
    """A persistent map of ``str`` to JSON values, plus an append-only log.

    Args:
        directory: where the SQLite files live (``<data_dir>/state``).
        damaged: why the database is not used (see :meth:`open`); reads are empty and
            writes raise :class:`relay.errors.StateUnavailableError`.
    """

    def __init__(self, directory: Path, *, damaged: str | None = None) -> None:
        self.damaged = damaged
        self._cache: diskcache.Cache | None = None
        self._log: diskcache.Deque | None = None
        if damaged is None:
            directory.mkdir(parents=True, exist_ok=True)
            self._cache = diskcache.Cache(str(directory), eviction_policy="none", size_limit=2**40)
            self._log = diskcache.Deque(directory=str(directory / "log"))

    @classmethod
    def open(cls, directory: Path, *, used: bool) -> KV:
        """Open the state database, or a damaged stand-in naming the problem (never raises).

        Blocking: call it from a thread.
        """
        problem = check_state(directory, used=used)
        if problem is None:
            try:
                return cls(directory)
            except (sqlite3.Error, OSError) as e:
                problem = f"{directory} cannot be opened: {e}"
        return cls(directory, damaged=problem)

    def _refuse(self) -> StateDamagedError:
        return StateDamagedError(
            f"state database: {self.damaged}; nothing can be saved until "
            "`relay state check --repair` (or restore state/ from a backup)"
        )

    def _db(self) -> tuple[diskcache.Cache, diskcache.Deque]:
        if self._cache is None or self._log is None:
            raise self._refuse()
        return self._cache, self._log

    # -- blocking API (call from threads) --------------------------------------

    def get_sync(self, key: str, default: JSON = None) -> JSON:
        """Return the value of ``key`` or ``default`` (``default`` when damaged).

        Raises:
            StateUnavailableError: the database cannot be read.
        """
        if self._cache is None:
            return default
        with _unavailable(f"cannot read {key}"):
            raw = self._cache.get(key)
        return default if raw is None else json.loads(raw)

    def set_sync(self, key: str, value: JSON) -> None:
        """Store ``value`` under ``key`` (durably, in one transaction).

        Raises:
            StateUnavailableError: the write failed (disk full, I/O error); nothing changed.
        """
        cache, _log = self._db()
        with _unavailable(f"cannot save {key}"):
            cache.set(key, json.dumps(value, separators=(",", ":")))

    def delete_sync(self, key: str) -> None:
        """Delete ``key`` if present.

        Raises:
            StateUnavailableError: the database is damaged or the write failed.
        """
        cache, _log = self._db()
        with _unavailable(f"cannot delete {key}"):
            cache.delete(key)

    def items_sync(self, prefix: str) -> Iterator[tuple[str, JSON]]:
        """Yield ``(key, value)`` for keys starting with ``prefix`` (none when damaged).

        One range query over the database (not one read per key), on a
        connection of its own: a snapshot of what was committed when it began.

        Raises:
            StateUnavailableError: the database cannot be read.
        """
        if self._cache is None:
            return
        cache = self._cache
        upper = prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else None
        query = "SELECT key, mode, filename, value FROM Cache WHERE raw = 1 AND key >= ?"
        params: tuple[str, ...] = (prefix,)
        if upper is not None:
            query += " AND key < ?"
            params = (prefix, upper)
        path = Path(cache.directory) / _DB_FILES[0]
        with (
            _unavailable(f"cannot read {prefix}*"),
            contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db,
        ):
            rows = db.execute(query, params).fetchall()
            for key, mode, filename, value in rows:
                if not isinstance(key, str) or not key.startswith(prefix):
                    continue
                raw = cache.disk.fetch(mode, filename, value, False)  # noqa: FBT003
                if isinstance(raw, str):
                    yield key, json.loads(raw)

    def write_many_sync(self, values: dict[str, JSON], deletes: list[str]) -> None:
        """Store ``values`` and delete ``deletes`` in one transaction (all or nothing).

        Raises:
            StateUnavailableError: the database is damaged or the write failed;
                nothing changed.
        """
        cache, _log = self._db()
        encoded = {k: json.dumps(v, separators=(",", ":")) for k, v in values.items()}
        with _unavailable(f"cannot save {len(values)} values"), cache.transact():
            for key in deletes:
                cache.delete(key)
            for key, text in encoded.items():
                cache.set(key, text)

    def append_log_sync(self, entry: JSON, max_entries: int = 100_000) -> None:
        """Append to the log, dropping the oldest past ``max_entries``.

        Raises:
            StateUnavailableError: the write failed (disk full, I/O error).
        """
        _cache, log = self._db()
        with _unavailable("cannot append to the audit log"):
            log.append(json.dumps(entry, separators=(",", ":")))
            while len(log) > max_entries:
                log.popleft()

    def log_sync(self, limit: int = 1000) -> list[JSON]:
        """The newest ``limit`` log entries, oldest first (none when damaged).

        Raises:
            StateUnavailableError: the log cannot be read.
        """
        if self._log is None:
            return []
        log = self._log
        with _unavailable("cannot read the audit log"):
            n = len(log)
            start = max(0, n - limit)
            return [json.loads(log[i]) for i in range(start, n)]

    # -- async API ---------------------------------------------------------------

    async def get(self, key: str, default: JSON = None) -> JSON:
        """Async :meth:`get_sync`."""
        return await asyncio.to_thread(self.get_sync, key, default)

    async def set(self, key: str, value: JSON) -> None:
        """Async :meth:`set_sync`."""
        await asyncio.to_thread(self.set_sync, key, value)

    async def delete(self, key: str) -> None:
        """Async :meth:`delete_sync`."""
        await asyncio.to_thread(self.delete_sync, key)

    async def items(self, prefix: str) -> list[tuple[str, JSON]]:
        """Async :meth:`items_sync`."""
        return await asyncio.to_thread(lambda: list(self.items_sync(prefix)))

    async def write_many(self, values: dict[str, JSON], deletes: list[str]) -> None:
        """Async :meth:`write_many_sync`."""
        await asyncio.to_thread(self.write_many_sync, values, deletes)

    async def append_log(self, entry: JSON) -> None:
        """Async :meth:`append_log_sync`."""
        await asyncio.to_thread(self.append_log_sync, entry)

    async def log(self, limit: int = 1000) -> list[JSON]:
        """Async :meth:`log_sync`."""
        return await asyncio.to_thread(self.log_sync, limit)

    def close(self) -> None:
        """Close the SQLite connections."""
        if self._cache is not None:
            self._cache.close()
        if self._log is not None:
            self._log.cache.close()

"""Content-addressed blob store on disk.

Rules (docs/PROTOCOL.md):

* A blob lives at ``blobs/sha256/<2 hex>/<62 hex>`` and is immutable.
* A fill downloads into ``blobs/tmp/<sha256>.<random>``, capped at the signed
  length and hashed while written; on completion it is fsync'ed, checked against
  the signed sha256 and length, ``os.replace``'d into place and the directory is
  fsync'ed. Nothing is ever resumed into a final path. On start, temps are deleted.
* A fill is readable while it grows: followers read ``[0, written)`` of the temp
  file through the fill's own descriptor (positional reads), so they stream as
  bytes arrive and keep working after the rename.
* Quota ``max_bytes`` (0 = none) counts complete blobs plus the signed length of
  every fill in progress. A new fill evicts least-recently-used blobs that are not
  pinned (the caller's pin set), not being filled, and not being served. If that
  cannot free enough, :class:`relay.errors.StoreFullError`: the caller answers 503
  for the new fill and keeps serving hits.
* Scrub re-hashes complete blobs and moves mismatches to ``blobs/quarantine/``.
* Every blocking call (open, stat, write, fsync, rename, unlink, hashing) runs in a
  thread via ``run_in_executor``; decisions are taken on the loop, under no lock
  but the loop's own single-threadedness, and return the I/O to do afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TypeVar

from relay.cache.singleflight import SingleFlight
from relay.errors import HashMismatchError, LengthMismatchError, StoreError, StoreFullError
from relay.storage.fsio import fsync_dir, hash_file

logger = logging.getLogger(__name__)

T = TypeVar("T")


class FillState(Enum):
    """Where a fill stands."""

    FILLING = "filling"  # bytes are arriving; followers read what is written
    COMPLETE = "complete"  # verified and committed to its final path
    FAILED = "failed"  # wrong hash, broken transfer or write error: followers abort


class ScrubOutcome(Enum):
    """Result of re-hashing one blob."""

    OK = "ok"  # the bytes match their name
    QUARANTINED = "quarantined"  # they do not: moved aside, fetched again when needed
    VANISHED = "vanished"  # the file is gone from disk


async def _run(func: Callable[..., T], *args: object) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, func, *args)


def split_digest(sha256: str) -> tuple[str, str]:
    """Return the two path parts of a digest: ``("ab", "cdef...")``."""
    return sha256[:2], sha256[2:]


class FillRestartedError(StoreError):
    """A fill started again from byte zero under a reader that had read its old bytes."""

    def __init__(self, sha256: str) -> None:
        self.sha256 = sha256
        super().__init__(f"fill of {sha256} restarted from zero")


class Fill:
    """One blob being downloaded; readable while it grows.

    Attributes:
        sha256: the signed digest.
        length: the signed length.
        written: bytes written so far (what followers may read).
        state: :class:`FillState`.
        error: why the fill failed, if it did.
        followers: how many readers attached over the fill's life.
    """

    def __init__(
        self, store: FsBlobStore, sha256: str, length: int, temp_path: Path, fd: int
    ) -> None:
        self._store = store
        self.sha256 = sha256
        self.length = length
        self.temp_path = temp_path
        self._fd = fd
        self._hasher = hashlib.sha256()
        self.written = 0
        self.state = FillState.FILLING
        self.error: BaseException | None = None
        self.followers = 0
        self.restarts = 0  # bumped when the fill starts again from byte zero
        self.started = float(int(time.time()))  # Last-Modified while filling, and after
        self._readers = 0
        self._progress = asyncio.Event()
        self._closed = False

    # -- writer side ------------------------------------------------------

    @property
    def offset(self) -> int:
        """Bytes written (where a resumed upstream transfer starts)."""
        return self.written

    async def write(self, chunk: bytes) -> None:
        """Append ``chunk`` (in a thread), hash it, and wake followers.

        Raises:
            LengthMismatchError: the chunk would go past the signed length.
        """
        if self.state is not FillState.FILLING:
            raise StoreError(f"fill of {self.sha256} is {self.state.value}")
        end = self.written + len(chunk)
        if end > self.length:
            raise LengthMismatchError(self.sha256, self.length, end)
        await _run(self._write_sync, chunk, self.written)
        self.written = end
        self._wake()

    def _write_sync(self, chunk: bytes, offset: int) -> None:
        view = memoryview(chunk)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n
        self._hasher.update(chunk)

    async def restart(self) -> None:
        """Start again from byte zero (keep the file).

        Followers that already sent bytes of the old attempt must abort (they see
        :attr:`restarts` change); those that sent nothing wait for the new bytes.
        """
        self._hasher = hashlib.sha256()
        self.written = 0
        self.restarts += 1
        self._wake()

    async def commit(self) -> Path:
        """Verify length and sha256, fsync, and move the blob into place.

        Returns:
            The final path.

        Raises:
            LengthMismatchError: fewer bytes than the signed length.
            HashMismatchError: the bytes do not hash to the signed digest.
        """
        if self.written != self.length:
            error: Exception = LengthMismatchError(self.sha256, self.length, self.written)
            await self.fail(error)
            raise error
        observed = self._hasher.hexdigest()
        if observed != self.sha256:
            error = HashMismatchError(self.sha256, self.sha256, observed)
            await self.fail(error)
            raise error
        final = self._store.path(self.sha256)
        try:
            await _run(self._commit_sync, final)
        except OSError as e:
            await self.fail(e)
            raise StoreError(f"cannot store {self.sha256}: {e}") from e
        self.state = FillState.COMPLETE
        self._store._fill_done(self, committed=True)  # noqa: SLF001
        self._wake()
        self._maybe_close()
        return final

    def _commit_sync(self, final: Path) -> None:
        os.fsync(self._fd)
        os.utime(self._fd, (self.started, self.started))
        final.parent.mkdir(parents=True, exist_ok=True)
        self.temp_path.replace(final)
        fsync_dir(final.parent)

    async def fail(self, error: BaseException) -> None:
        """Abandon the fill: wake followers (they abort) and delete the temp file."""
        if self.state is not FillState.FILLING or self.error is not None:
            return
        self.error = error
        # The temp goes before anyone can see the failure: once a client has seen it,
        # nothing of the failed fill is left on disk.
        with contextlib.suppress(OSError):
            await _run(os.unlink, self.temp_path)
        self.state = FillState.FAILED
        self._store._fill_done(self, committed=False)  # noqa: SLF001
        self._wake()
        self._maybe_close()

    def _wake(self) -> None:
        self._progress.set()
        self._progress = asyncio.Event()

    # -- follower side ----------------------------------------------------

    def attach(self) -> None:
        """Register a reader; the descriptor stays open until it detaches."""
        self.followers += 1
        self._readers += 1

    def detach(self) -> None:
        """Unregister a reader."""
        self._readers -= 1
        self._maybe_close()

    async def wait_change(self, seen: int, timeout: float) -> None:
        """Return once ``written`` differs from ``seen``, or the fill ended or restarted.

        Raises:
            TimeoutError: nothing changed for ``timeout`` seconds.
        """
        restarts = self.restarts
        async with asyncio.timeout(timeout):
            while (
                self.state is FillState.FILLING
                and self.written == seen
                and self.restarts == restarts
            ):
                await self._progress.wait()

    async def wait_beyond(self, offset: int) -> None:
        """Return once more than ``offset`` bytes are written, or the fill ended."""
        while self.state is FillState.FILLING and self.written <= offset:
            await self._progress.wait()

    async def read(self, offset: int, size: int, restarts: int) -> bytes:
        """Read up to ``size`` bytes at ``offset`` of the attempt ``restarts`` (in a thread).

        Raises:
            StoreError: the fill failed (the follower must abort its response).
            FillRestartedError: the fill started again from zero since attempt
                ``restarts``: the bytes at ``offset`` are not the ones the reader
                expects.
        """
        if self.state is FillState.FAILED:
            raise StoreError(f"fill of {self.sha256} failed: {self.error}")
        if self.restarts != restarts:
            raise FillRestartedError(self.sha256)
        size = min(size, self.written - offset)
        if size <= 0:
            return b""
        data = await _run(os.pread, self._fd, size, offset)
        if self.restarts != restarts:  # restarted while the read ran
            raise FillRestartedError(self.sha256)
        return data

    def _maybe_close(self) -> None:
        if self._closed or self.state is FillState.FILLING or self._readers > 0:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            # Closing a descriptor does not block on a regular file's data.
            os.close(self._fd)


@dataclass(slots=True)
class StoreStats:
    """Counters the metrics module reads."""

    evictions: int = 0
    evicted_bytes: int = 0
    full_refusals: int = 0
    quarantined: int = 0
    scrubbed: int = 0
    fills_committed: int = 0
    fills_failed: int = 0
    fill_failures: Counter[str] = field(default_factory=Counter)


class FsBlobStore:
    """Blobs on a local filesystem, addressed by sha256.

    Args:
        root: the ``blobs/`` directory.
        max_bytes: quota in bytes (0 = unlimited).
        pinned: returns the digests that must not be evicted (kept versions,
            approved or offered versions, delta bases).
    """

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int = 0,
        pinned: Callable[[], Iterable[str]] | None = None,
    ) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._pinned = pinned or (lambda: ())
        self._sizes: OrderedDict[str, int] = OrderedDict()  # LRU order: oldest first
        self._mtimes: dict[str, float] = {}
        # Called with a digest whenever a blob leaves the store (open-file caches).
        self.on_removed: list[Callable[[str], None]] = []
        # Called with (digest, size) for each blob evicted for space (metrics).
        self.on_evicted: list[Callable[[str, int], None]] = []
        self._fills: dict[str, Fill] = {}
        self._serving: Counter[str] = Counter()
        # Digests whose bytes were hashed (or written and verified) since start.
        self._checked: set[str] = set()
        self._checking: SingleFlight[str, ScrubOutcome] = SingleFlight()
        self._used = 0
        self.stats = StoreStats()

    @property
    def blobs_dir(self) -> Path:
        """Where complete blobs live."""
        return self.root / "sha256"

    @property
    def tmp_dir(self) -> Path:
        """Where fills write."""
        return self.root / "tmp"

    @property
    def quarantine_dir(self) -> Path:
        """Where scrub moves blobs whose bytes no longer match their name."""
        return self.root / "quarantine"

    def path(self, sha256: str) -> Path:
        """The final path of a blob (whether or not it exists)."""
        head, rest = split_digest(sha256)
        return self.blobs_dir / head / rest

    # -- start-up ---------------------------------------------------------

    async def open(self) -> None:
        """Create directories, delete leftover temps, and index the blobs on disk."""
        entries = await _run(self._open_sync)
        entries.sort(key=lambda e: e[2])  # least recently modified first
        self._sizes.clear()
        self._used = 0
        for sha, size, mtime in entries:
            self._sizes[sha] = size
            self._mtimes[sha] = float(int(mtime))
            self._used += size

    def _open_sync(self) -> list[tuple[str, int, float]]:
        for d in (self.blobs_dir, self.tmp_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp_dir.iterdir():
            logger.info("removing partial download %s", leftover.name)
            with contextlib.suppress(OSError):
                leftover.unlink()
        entries = []
        for head in self.blobs_dir.iterdir():
            if not head.is_dir() or len(head.name) != 2:
                continue
            for blob in head.iterdir():
                sha = head.name + blob.name
                if len(sha) != 64:
                    continue
                st = blob.stat()
                entries.append((sha, st.st_size, st.st_mtime))
        return entries

    # -- queries ----------------------------------------------------------

    def contains(self, sha256: str) -> bool:
        """Whether a complete blob is stored."""
        return sha256 in self._sizes

    def digests(self) -> list[str]:
        """Every complete blob's digest."""
        return list(self._sizes)

    @property
    def used_bytes(self) -> int:
        """Bytes of complete blobs plus reservations of fills in progress."""
        return self._used

    @property
    def object_count(self) -> int:
        """Number of complete blobs."""
        return len(self._sizes)

    def fill_in_progress(self, sha256: str) -> Fill | None:
        """The running fill of ``sha256``, if any (single-flight lookup)."""
        return self._fills.get(sha256)

    def mtime(self, sha256: str) -> float:
        """The blob's Last-Modified time (stable while it is stored)."""
        return self._mtimes.get(sha256, 0.0)

    def touch(self, sha256: str) -> None:
        """Mark a blob as just used (LRU)."""
        if sha256 in self._sizes:
            self._sizes.move_to_end(sha256)

    def busy(self, sha256: str) -> bool:
        """Whether ``sha256`` is being served or filled right now."""
        return self._serving[sha256] > 0 or sha256 in self._fills

    def serving(self, sha256: str) -> contextlib.AbstractContextManager[None]:
        """Context manager that pins ``sha256`` while a response reads it."""
        return _Serving(self._serving, sha256)

    # -- fills ------------------------------------------------------------

    async def begin_fill(self, sha256: str, length: int) -> Fill:
        """Reserve space and open a temp file for a new fill.

        The caller (the mirror) ensures a single fill per digest; this registers
        the fill once its temp file exists.

        Raises:
            StoreFullError: the quota cannot make room for ``length`` bytes.
            StoreError: the temp file cannot be created.
        """
        if sha256 in self._fills:
            raise StoreError(f"a fill of {sha256} is already running")
        victims = self._make_room(length)
        self._used += length
        temp = self.tmp_dir / f"{sha256}.{secrets.token_hex(4)}"
        try:
            await self._evict(victims)
            fd = await _run(os.open, temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as e:
            self._used -= length
            raise StoreError(f"cannot create {temp}: {e}") from e
        fill = Fill(self, sha256, length, temp, fd)
        self._fills[sha256] = fill
        return fill

    def _fill_done(self, fill: Fill, *, committed: bool) -> None:
        if self._fills.get(fill.sha256) is fill:
            del self._fills[fill.sha256]
        self._used -= fill.length
        if committed:
            self.stats.fills_committed += 1
            self._checked.add(fill.sha256)
            if fill.sha256 not in self._sizes:
                self._sizes[fill.sha256] = fill.length
                self._mtimes[fill.sha256] = fill.started
                self._used += fill.length
        else:
            self.stats.fills_failed += 1
            self.stats.fill_failures[type(fill.error).__name__] += 1

    def _make_room(self, needed: int) -> list[tuple[str, int]]:
        """Decide which blobs to evict so ``needed`` bytes fit (no I/O)."""
        if not self.max_bytes:
            return []
        excess = self._used + needed - self.max_bytes
        if excess <= 0:
            return []
        pinned = set(self._pinned())
        victims: list[tuple[str, int]] = []
        freed = 0
        for sha, size in self._sizes.items():  # least recently used first
            if freed >= excess:
                break
            if sha in pinned or self.busy(sha):
                continue
            victims.append((sha, size))
            freed += size
        if freed < excess:
            self.stats.full_refusals += 1
            raise StoreFullError(needed, self.max_bytes - self._used + freed)
        for sha, size in victims:
            del self._sizes[sha]
            self._checked.discard(sha)
            self._used -= size
            self._removed(sha)
        return victims

    def _removed(self, sha256: str) -> None:
        for callback in self.on_removed:
            callback(sha256)

    async def _evict(self, victims: list[tuple[str, int]]) -> None:
        for sha, size in victims:
            logger.info("evicting %s (%d bytes)", sha, size)
            with contextlib.suppress(FileNotFoundError):
                await _run(os.unlink, self.path(sha))
            self.stats.evictions += 1
            self.stats.evicted_bytes += size
            for callback in self.on_evicted:
                callback(sha, size)

    async def remove(self, sha256: str) -> None:
        """Delete a complete blob (no-op if absent)."""
        self._checked.discard(sha256)
        size = self._sizes.pop(sha256, None)
        if size is not None:
            self._used -= size
        self._removed(sha256)
        with contextlib.suppress(FileNotFoundError):
            await _run(os.unlink, self.path(sha256))

    # -- checks and scrub -------------------------------------------------

    async def check(self, sha256: str) -> bool:
        """Whether the stored blob's bytes are its own; hashed once per start.

        A blob written by a verified fill of this run, or hashed since start, is
        trusted; any other is hashed now (in a thread; concurrent callers share
        one hash). A blob whose bytes do not match is quarantined (``False``):
        the caller fetches it again.

        Raises:
            OSError: the blob cannot be read for a reason other than its absence.
        """
        if sha256 in self._checked:
            return True
        outcome, _ = await self._checking.run(sha256, lambda: self.scrub_one(sha256))
        return outcome is ScrubOutcome.OK

    async def scrub_one(self, sha256: str) -> ScrubOutcome:
        """Re-hash one blob; quarantine it if its bytes do not match its name or length."""
        path = self.path(sha256)
        try:
            observed, length = await _run(hash_file, path)
        except FileNotFoundError:
            await self.remove(sha256)
            return ScrubOutcome.VANISHED
        self.stats.scrubbed += 1
        expected = self._sizes.get(sha256)
        if observed == sha256 and (expected is None or length == expected):
            self._checked.add(sha256)
            return ScrubOutcome.OK
        await self.quarantine(sha256, f"hashes to {observed}, {length} bytes")
        return ScrubOutcome.QUARANTINED

    async def quarantine(self, sha256: str, why: str) -> None:
        """Move a damaged blob aside (``quarantine/``); the next request fetches it again."""
        if sha256 not in self._sizes:
            return
        logger.error("stored blob %s is damaged (%s): quarantined", sha256, why)
        size = self._sizes.pop(sha256)
        self._used -= size
        self._checked.discard(sha256)
        self._removed(sha256)
        dest = self.quarantine_dir / f"{sha256}.{int(time.time())}"
        with contextlib.suppress(FileNotFoundError):
            await _run(os.replace, self.path(sha256), dest)
        self.stats.quarantined += 1

    async def close(self) -> None:
        """Abandon fills in progress (their temps are deleted)."""
        for fill in list(self._fills.values()):
            await fill.fail(StoreError("relay shutting down"))


class _Serving(contextlib.AbstractContextManager[None]):
    def __init__(self, counter: Counter[str], sha256: str) -> None:
        self._counter = counter
        self._sha = sha256

    def __enter__(self) -> None:
        self._counter[self._sha] += 1

    def __exit__(self, *exc: object) -> None:
        self._counter[self._sha] -= 1
        if self._counter[self._sha] <= 0:
            del self._counter[self._sha]

"""The verifying mirror: sync, single-flight fills, prefetch and scrub.

Rules:

* The relay trusts only the pinned root. At start it reloads the metadata it
  verified before (re-verifying signatures as of the time it was verified), so an
  upstream cannot roll it back even across restarts.
* A sync run walks roots, then timestamp, snapshot, targets and delegated targets
  through :class:`relay.core.verify.TrustSession`. Only a complete, verified generation
  replaces the served one; a failed or hostile sync leaves the previous good state
  serving. New files are written versioned first and ``timestamp.json`` last, each
  through a temp file, fsync and ``os.replace``.
* One upstream fill per blob (single-flight): :meth:`Mirror.open_blob` returns
  either the stored file or the running :class:`relay.cache.store.Fill`. A fill runs as
  a task of its own; a requester that disconnects does not cancel it.
* A target is served only if the verified metadata names its path and sha256.
* A target whose upstream bytes failed verification (hash or length) is not fetched
  again for a backoff (:data:`BACKOFF_FIRST`, doubling up to :data:`BACKOFF_MAX`,
  forgotten once a fill of it succeeds or by :meth:`Mirror.clear_backoff`):
  meanwhile :meth:`Mirror.open_blob` raises :class:`relay.errors.TargetBackoffError`
  (the server answers 503 with ``Retry-After``), so clients asking again cannot make
  the relay download the same bad bytes again and again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Protocol

from relay.cache.singleflight import SingleFlight
from relay.cache.store import Fill, FsBlobStore, ScrubOutcome
from relay.cache.upstream import Upstream
from relay.core.model import Target
from relay.core.policy import Prefetch
from relay.core.verify import (
    MAX_ROOT_ROTATIONS,
    ROOT_MAX_LENGTH,
    TIMESTAMP_MAX_LENGTH,
    TimestampOutcome,
    TrustSession,
    VerifiedMetadata,
    root_version,
)
from relay.errors import (
    MetadataRejectedError,
    RelayError,
    StoreError,
    StoreFullError,
    TargetBackoffError,
    TransportError,
    UpstreamContentError,
    UpstreamHTTPError,
)
from relay.metrics import RelayMetrics
from relay.storage.fsio import fsync_dir, write_atomic

logger = logging.getLogger(__name__)

BACKOFF_FIRST = 60.0
"""Seconds a target whose upstream copy failed verification is not fetched again."""
BACKOFF_MAX = 3600.0
"""The longest such backoff (it doubles at each new failure)."""

_STATE_FILE = "state.json"
_KEEP_GENERATIONS = 3


class SyncResult(Enum):
    """Outcome of one sync run: a new generation, nothing newer, or failed (old one served)."""

    NEW = "new"
    UNCHANGED = "unchanged"
    FAILED = "failed"


def _with_roots(verified: VerifiedMetadata, files: Mapping[str, bytes]) -> VerifiedMetadata:
    """``verified`` serving also every root among ``files`` (clients walk old roots)."""
    roots = {n: b for n, b in files.items() if n.endswith(".root.json")}
    return dataclasses.replace(verified, files={**roots, **verified.files})


@dataclass(frozen=True, slots=True)
class StoredBlob:
    """A complete blob on disk."""

    path: Path
    length: int


class MetadataDir:
    """The relay's verified metadata on disk (``<data_dir>/metadata``), byte-exact."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> tuple[dict[str, bytes], dict[str, object]]:
        """Delete temps left by a crash, then :meth:`read` (blocking; the owner only)."""
        self.path.mkdir(parents=True, exist_ok=True)
        for entry in self.path.iterdir():
            if entry.name.startswith("."):
                with contextlib.suppress(OSError):
                    entry.unlink()
        return self.read()

    def read(self) -> tuple[dict[str, bytes], dict[str, object]]:
        """Read every metadata file and the state record, changing nothing (blocking).

        Safe beside a running relay: a file pruned while the directory is listed is
        left out.

        Raises:
            OSError: the directory cannot be listed.
        """
        files: dict[str, bytes] = {}
        state: dict[str, object] = {}
        for entry in self.path.iterdir():
            if entry.name.startswith("."):
                continue  # a temp being written, or left by a crash
            if entry.name == _STATE_FILE:
                with contextlib.suppress(ValueError, OSError):
                    state = json.loads(entry.read_bytes())
                continue
            if entry.name.endswith(".json"):
                with contextlib.suppress(FileNotFoundError):
                    files[entry.name] = entry.read_bytes()
        return files, state

    def save(self, new_files: dict[str, bytes], state: dict[str, object]) -> None:
        """Write ``new_files`` (timestamp last) and the state record (blocking)."""
        self.path.mkdir(parents=True, exist_ok=True)
        ordered = sorted(new_files, key=lambda n: n == "timestamp.json")
        for name in ordered:
            write_atomic(self.path / name, new_files[name])
        write_atomic(self.path / _STATE_FILE, json.dumps(state).encode())
        fsync_dir(self.path)

    def prune(self, keep: set[str]) -> None:
        """Delete versioned snapshot/targets files not in ``keep`` (roots are kept)."""
        for entry in self.path.iterdir():
            name = entry.name
            if name.endswith(".root.json") or name in keep or name == _STATE_FILE:
                continue
            if name.endswith(".json") and name[0].isdigit():
                with contextlib.suppress(OSError):
                    entry.unlink()


def _version_of(name: str) -> int:
    head = name.split(".", 1)[0]
    return int(head) if head.isascii() and head.isdigit() else -1


def newest_root_session(
    pinned_root: bytes, files: Mapping[str, bytes], reference: dt.datetime | None = None
) -> TrustSession:
    """A trust session advanced through the stored roots that follow ``pinned_root``.

    A stored root that fails verification ends the walk (it is logged).

    Args:
        pinned_root: the trusted root's bytes.
        files: stored metadata, file name to bytes (``N.root.json`` are looked at).
        reference: the time expiry is judged at (``None``: now).

    Returns:
        The session, its trusted root the newest one that verified.

    Raises:
        MetadataRejectedError: ``pinned_root`` itself is not valid root metadata.
    """
    session = TrustSession(pinned_root, reference)
    while True:
        data = files.get(f"{session.next_root_version}.root.json")
        if data is None:
            return session
        try:
            session.update_root(data)
        except MetadataRejectedError as e:
            logger.warning("stored root %d rejected: %s", session.next_root_version, e)
            return session


def reverify_stored(
    pinned_root: bytes, files: Mapping[str, bytes], reference: dt.datetime | None
) -> VerifiedMetadata | None:
    """Verify stored metadata again from ``pinned_root``, as a client would walk it.

    Args:
        pinned_root: the trusted root's bytes.
        files: stored metadata, file name to bytes.
        reference: the time expiry is judged at (the time it was first verified, so a
            restart does not refuse what expired since; ``None``: now).

    Returns:
        The verified generation (every stored root included), or ``None`` when a file
        it needs is missing.

    Raises:
        MetadataRejectedError: a signature, version, hash, length or expiry check fails.
        ValueError: a file is not valid metadata.
    """
    session = newest_root_session(pinned_root, files, reference)
    timestamp = files.get("timestamp.json")
    if timestamp is None:
        return None
    session.update_timestamp(timestamp)
    snapshot = files.get(f"{session.snapshot_version}.snapshot.json")
    if snapshot is None:
        return None
    session.update_snapshot(snapshot)
    for role, delegator, version, _ in session.roles_to_load():
        data = files.get(f"{version}.{role}.json")
        if data is None:
            return None
        session.update_targets(role, delegator, data)
    # Serve every stored root (older than the pinned one too: clients walk them).
    return _with_roots(session.result(), files)


def reverify_saved(
    pinned_root: bytes, files: Mapping[str, bytes], state: Mapping[str, object]
) -> tuple[VerifiedMetadata | None, float | None]:
    """Verify again what :class:`MetadataDir` read, as of the time it was verified.

    Args:
        pinned_root: the trusted root's bytes.
        files: stored metadata, file name to bytes.
        state: the state record (``verified_at``: when the generation was verified).

    Returns:
        The verified generation (``None`` when a file is missing, or when it does not
        verify: that is logged) and the time it was verified.
    """
    verified_at = state.get("verified_at")
    when = float(verified_at) if isinstance(verified_at, int | float) else None
    reference = dt.datetime.fromtimestamp(when, dt.UTC) if when is not None else None
    try:
        return reverify_stored(pinned_root, files, reference), when
    except (MetadataRejectedError, ValueError) as e:
        logger.warning("stored metadata cannot be reloaded: %s", e)
        return None, when


class StoredMetadata:
    """A read-only view of the verified metadata a relay keeps on disk.

    What a relay's worker processes serve: the generation the leader verified and
    saved (:class:`MetadataDir`), verified again from the pinned root when it is
    read, as :meth:`Mirror.open` does at start. It never writes and never asks an
    upstream; a generation that cannot be read or verified leaves the previous one
    served.

    Args:
        trusted_root: the pinned root's bytes.
        metadata_dir: the leader's ``<data_dir>/metadata``.
    """

    def __init__(self, trusted_root: bytes, metadata_dir: Path) -> None:
        self._pinned_root = trusted_root
        self._metadata = MetadataDir(metadata_dir)
        self.current: VerifiedMetadata | None = None
        self.verified_at: float | None = None

    async def reload(self) -> int | None:
        """Read and verify the stored generation; keep the served one if that fails.

        Returns:
            The timestamp version served now (``None``: no verified metadata yet).

        Raises:
            OSError: the directory cannot be listed.
        """
        files, state = await asyncio.to_thread(self._metadata.read)
        verified, when = await asyncio.to_thread(reverify_saved, self._pinned_root, files, state)
        if verified is not None and (
            self.current is None or verified.timestamp_version >= self.current.timestamp_version
        ):
            self.current, self.verified_at = verified, when
        return self.current.timestamp_version if self.current is not None else None

    def metadata_file(self, name: str) -> bytes | None:
        """The exact bytes of a metadata file of the generation read, or ``None``."""
        return self.current.files.get(name) if self.current is not None else None

    def resolve(self, url_path: str) -> Target | None:
        """The verified target served at ``targets/<url_path>``, or ``None``."""
        return self.current.target_for_url(url_path) if self.current is not None else None


class Retention(Protocol):
    """What the relay fetches ahead and keeps: decided above the cache."""

    def wanted(self, targets: Iterable[Target]) -> set[str]:
        """The digests among ``targets`` to fetch before anyone asks for them (once a pass)."""
        ...

    def pins(self) -> set[str]:
        """The digests the store must not evict."""
        ...


class _KeepEverything:
    def wanted(self, targets: Iterable[Target]) -> set[str]:
        return {t.sha256 for t in targets}

    def pins(self) -> set[str]:
        return set()


class Mirror:
    """Mirror of one upstream TUF repository with a verified blob cache.

    Args:
        trusted_root: the pinned root's bytes.
        upstream: the upstreams, with failover.
        store: the blob store.
        metadata_dir: where verified metadata is kept.
        metrics: the application's metrics.
        prefetch: which blobs to fetch ahead of requests.
        retention: what to fetch ahead and what the store must keep (decided
            above the cache, by the policy and the delta service); without one,
            everything is prefetched (as ``prefetch`` allows) and nothing pinned.
        delta_fill: tried before the upstream's full target (rebuilds it from a
            parent relay's patch); returns whether the fill holds the target.
    """

    def __init__(
        self,
        *,
        trusted_root: bytes,
        upstream: Upstream,
        store: FsBlobStore,
        metadata_dir: Path,
        metrics: RelayMetrics,
        prefetch: Prefetch = Prefetch.ALL,
        retention: Retention | None = None,
        delta_fill: Callable[[Target, Fill], Awaitable[bool]] | None = None,
    ) -> None:
        self._pinned_root = trusted_root
        self.upstream = upstream
        self.store = store
        self.metrics = metrics
        self.prefetch = prefetch
        self._retention = retention or _KeepEverything()
        self._metadata = MetadataDir(metadata_dir)
        self.current: VerifiedMetadata | None = None
        self._served: dict[str, bytes] = {}
        self._generations: list[set[str]] = []
        self._starting: SingleFlight[str, Fill] = SingleFlight()
        # sha256 -> (monotonic time the backoff ends, its length, the reason)
        self._backoff: dict[str, tuple[float, float, str]] = {}
        self.backoff_first = BACKOFF_FIRST
        self.backoff_max = BACKOFF_MAX
        metrics.bind(metrics.fill_backoff, lambda: float(len(self._backoff)))
        self._tasks: set[asyncio.Task[object]] = set()
        self._sync_lock = asyncio.Lock()
        self._older_roots_tried = False
        self._wake = asyncio.Event()
        self.last_sync_ok: float | None = None
        self.last_sync_error: str = ""
        self.last_sync_failed_at: float | None = None
        self.listeners: list[Callable[[VerifiedMetadata], Awaitable[None]]] = []
        self.delta_fill = delta_fill
        metrics.bind(metrics.last_sync_age, self._sync_age)
        metrics.bind(metrics.timestamp_expiry, self.seconds_until_expiry)
        metrics.bind(metrics.cache_bytes, lambda: float(store.used_bytes))
        metrics.bind(metrics.cache_objects, lambda: float(store.object_count))

    # -- state --------------------------------------------------------------

    def _sync_age(self) -> float:
        if self.last_sync_ok is None:
            return float("nan")
        return time.time() - self.last_sync_ok

    def seconds_until_expiry(self) -> float:
        """Seconds until the served metadata expires (NaN with none)."""
        if self.current is None:
            return float("nan")
        return (self.current.expires - dt.datetime.now(dt.UTC)).total_seconds()

    def metadata_file(self, name: str) -> bytes | None:
        """The exact bytes of a served metadata file, or ``None``."""
        return self._served.get(name)

    # -- start-up -----------------------------------------------------------

    async def open(self) -> None:
        """Load the store index and the metadata verified before (if any)."""
        await self.store.open()
        files, state = await asyncio.to_thread(self._metadata.load)
        if not files:
            return
        self.current, verified_at = reverify_saved(self._pinned_root, files, state)
        if self.current is not None:
            self._publish(self.current)
            self.last_sync_ok = verified_at
        else:
            # Keep the verified roots: they still protect against rollback of root.
            self._served.update({n: b for n, b in files.items() if n.endswith(".root.json")})

    def _publish(self, verified: VerifiedMetadata) -> None:
        self.current = verified
        names = set(verified.files)
        self._generations.append(names)
        del self._generations[:-_KEEP_GENERATIONS]
        keep = set().union(*self._generations)
        served = {n: b for n, b in self._served.items() if n in keep or "root" in n}
        served.update(verified.files)
        self._served = served

    # -- sync ---------------------------------------------------------------

    async def sync_once(self) -> SyncResult:
        """Run one sync; never raises for upstream trouble (it is counted and logged)."""
        async with self._sync_lock:
            try:
                result = await self._sync()
            except (UpstreamContentError, TransportError, StoreError, OSError) as e:
                # OSError: the metadata could not be saved (disk full, I/O error); the
                # previous generation is still served and the next run tries again.
                reason = type(e).__name__
                if isinstance(e, MetadataRejectedError):
                    reason = f"{reason}:{e.role}"
                self.last_sync_error = str(e)
                self.last_sync_failed_at = time.time()
                self.metrics.sync_runs.labels("failed").inc()
                self.metrics.sync_failures.labels(reason).inc()
                logger.warning("sync failed: %s", e)
                return SyncResult.FAILED
            self.last_sync_ok = time.time()
            self.last_sync_error = ""
            self.last_sync_failed_at = None
            self.metrics.sync_runs.labels(result.value).inc()
            logger.info(
                "sync %s: timestamp v%s",
                result.value,
                self.current.timestamp_version if self.current else "?",
            )
        if result is SyncResult.NEW and self.current is not None:
            for listener in list(self.listeners):
                try:
                    await listener(self.current)
                except Exception:
                    logger.exception("listener failed after sync")
        return result

    async def _sync(self) -> SyncResult:
        previous = self.current
        known = dict(self._served)
        session = newest_root_session(self._pinned_root, known)
        new_roots: dict[str, bytes] = {}
        for _ in range(MAX_ROOT_ROTATIONS):
            name = f"{session.next_root_version}.root.json"
            try:
                data = await self.upstream.get_metadata(name, ROOT_MAX_LENGTH)
            except UpstreamHTTPError as e:
                if e.status_code == 404:
                    break
                raise
            session.update_root(data)
            new_roots[name] = data
        new_roots.update(await self._older_roots(known))
        if new_roots:
            # Roots are verified one by one and kept even if the rest fails.
            await asyncio.to_thread(self._save_roots, new_roots)
            self._served.update(new_roots)
        if previous is not None:
            session.load_trusted_timestamp(previous.files["timestamp.json"])
        ts_bytes = await self.upstream.get_metadata("timestamp.json", TIMESTAMP_MAX_LENGTH)
        outcome = session.update_timestamp(ts_bytes)
        if outcome is TimestampOutcome.UNCHANGED and previous is not None and not new_roots:
            return SyncResult.UNCHANGED
        snap_name = f"{session.snapshot_version}.snapshot.json"
        stored_snapshot = known.get(snap_name)
        if not (stored_snapshot is not None and session.load_trusted_snapshot(stored_snapshot)):
            if previous is not None:
                prev_snap = next(
                    (b for n, b in previous.files.items() if n.endswith(".snapshot.json")), None
                )
                if prev_snap is not None:
                    session.load_trusted_snapshot(prev_snap)
            data = await self.upstream.get_metadata(snap_name, session.snapshot_max_length())
            session.update_snapshot(data)
        for role, delegator, version, max_length in session.roles_to_load():
            name = f"{version}.{role}.json"
            data_or_none = known.get(name)
            if data_or_none is not None:
                try:
                    session.update_targets(role, delegator, data_or_none)
                    continue
                except MetadataRejectedError:
                    pass
            data = await self.upstream.get_metadata(name, max_length)
            session.update_targets(role, delegator, data)
        verified = _with_roots(session.result(previous), known)
        new_files = {
            n: b for n, b in verified.files.items() if known.get(n) != b or n == "timestamp.json"
        }
        state = {"verified_at": time.time(), "files": sorted(verified.files)}
        await asyncio.to_thread(self._save_generation, new_files, state)
        self._publish(verified)
        return SyncResult.NEW

    async def _older_roots(self, known: dict[str, bytes]) -> dict[str, bytes]:
        """Roots older than the pinned one, so agents that ship them can walk forward.

        They are trusted only as a chain that ends exactly at the pinned root: each is
        signed by its predecessor's keys and its own, and the pinned root is signed by
        the last of them. Fetched once; a failure only means they are not served.
        """
        pinned = root_version(self._pinned_root)
        if pinned <= 1 or "1.root.json" in known or self._older_roots_tried:
            return {}
        self._older_roots_tried = True
        try:
            chain = {1: await self.upstream.get_metadata("1.root.json", ROOT_MAX_LENGTH)}
            session = TrustSession(chain[1])
            for version in range(2, pinned):
                name = f"{version}.root.json"
                chain[version] = await self.upstream.get_metadata(name, ROOT_MAX_LENGTH)
                session.update_root(chain[version])
            session.update_root(self._pinned_root)
        except (UpstreamContentError, TransportError) as e:
            logger.warning("roots older than the pinned root %d not served: %s", pinned, e)
            return {}
        return {f"{v}.root.json": data for v, data in chain.items()}

    def _save_roots(self, roots: dict[str, bytes]) -> None:
        for name, data in sorted(roots.items(), key=lambda kv: _version_of(kv[0])):
            self._metadata.path.mkdir(parents=True, exist_ok=True)
            write_atomic(self._metadata.path / name, data)
        fsync_dir(self._metadata.path)

    def _save_generation(self, new_files: dict[str, bytes], state: dict[str, object]) -> None:
        self._metadata.save(new_files, state)
        keep = set().union(*self._generations, set(new_files))
        self._metadata.prune(keep)

    async def run_sync_loop(self, interval: float, jitter: float) -> None:
        """Sync now, then every ``interval`` (+ jitter) seconds or when triggered."""
        while True:
            # Cleared before the run: a trigger that comes during it asks for another.
            self._wake.clear()
            await self.sync_once()
            delay = interval + random.uniform(0, jitter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    def trigger_sync(self) -> None:
        """Ask the sync loop to run now."""
        self._wake.set()

    # -- blobs --------------------------------------------------------------

    def resolve(self, url_path: str) -> Target | None:
        """The verified target served at ``targets/<url_path>``, or ``None``."""
        if self.current is None:
            return None
        return self.current.target_for_url(url_path)

    async def open_blob(self, target: Target) -> StoredBlob | Fill:
        """Return the stored blob, or the fill that is (or now starts) fetching it.

        Raises:
            StoreFullError: no room for a new fill (answer 503, keep serving hits).
            StoreError: the store cannot create the fill.
        """
        sha = target.sha256
        if self.store.contains(sha):
            try:
                intact = await self.store.check(sha)
            except OSError as e:
                raise StoreError(f"cannot read stored {target.path}: {e}") from e
            if intact:
                self.store.touch(sha)
                return StoredBlob(self.store.path(sha), target.length)
            self.metrics.scrub.labels(ScrubOutcome.QUARANTINED.value).inc()
            # Damaged on disk and moved aside: fetch it again, as on a miss.
        fill = self.store.fill_in_progress(sha)
        if fill is not None:
            return fill
        if (backoff := self._backoff.get(sha)) is not None:
            left = backoff[0] - time.monotonic()
            if left > 0:
                raise TargetBackoffError(target.path, left, backoff[2])
        fill, started = await self._starting.run(
            sha, lambda: self.store.begin_fill(sha, target.length)
        )
        if started:
            self._spawn(self._run_fill(fill, target))
        return fill

    def _spawn(self, coro: Awaitable[object]) -> None:
        task: asyncio.Task[object] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_fill(self, fill: Fill, target: Target) -> None:
        base = ""
        try:
            rebuilt = False
            if self.delta_fill is not None:
                try:
                    rebuilt = await self.delta_fill(target, fill)
                except (RelayError, OSError) as e:
                    logger.info("delta fill of %s failed, fetching it whole: %s", target.path, e)
                    await fill.restart()
            if not rebuilt:
                if fill.written:
                    await fill.restart()
                base = await self.upstream.fetch_blob(target.url_path, target.length, fill)
            await fill.commit()
        except UpstreamContentError as e:
            if base:
                self.upstream.mark_content_error(base, e)
            self._back_off(target.sha256, type(e).__name__)
            await fill.fail(e)
            self.metrics.fills.labels(type(e).__name__).inc()
            logger.error("fill of %s refused: %s", target.path, e)  # noqa: TRY400 - expected
            return
        except (RelayError, OSError) as e:
            await fill.fail(e)
            self.metrics.fills.labels(type(e).__name__).inc()
            logger.warning("fill of %s failed: %s", target.path, e)
            return
        except asyncio.CancelledError:
            await fill.fail(StoreError("cancelled"))
            raise
        except Exception as e:
            # Not expected: log it whole, and still end the fill so no follower waits.
            logger.exception("fill of %s broke", target.path)
            await fill.fail(e)
            self.metrics.fills.labels(type(e).__name__).inc()
            return
        self._backoff.pop(target.sha256, None)
        self.metrics.fills.labels("ok").inc()
        self.metrics.fill_waiters.observe(fill.followers)
        if fill.followers > 1:
            self.metrics.coalesced_bytes.inc((fill.followers - 1) * target.length)

    def clear_backoff(self) -> int:
        """Forget every backoff (an operator's sync says the upstream was fixed).

        Returns:
            How many targets were in backoff.
        """
        n = len(self._backoff)
        self._backoff.clear()
        return n

    def _back_off(self, sha256: str, reason: str) -> None:
        previous = self._backoff.get(sha256)
        length = self.backoff_first
        if previous is not None:
            length = min(self.backoff_max, previous[1] * 2)
        self._backoff[sha256] = (time.monotonic() + length, length, reason)

    async def ensure(self, target: Target) -> None:
        """Fetch ``target`` into the store if it is not there; wait until done.

        Raises:
            StoreError: the fill failed or there is no room.
        """
        source = await self.open_blob(target)
        if isinstance(source, Fill):
            source.attach()
            try:
                await source.wait_beyond(target.length)
            finally:
                source.detach()
            if source.error is not None:
                raise StoreError(f"fill of {target.path} failed: {source.error}")

    async def prefetch_now(self, concurrency: int = 2) -> int:
        """Fetch the blobs the prefetch mode asks for; return how many were fetched."""
        if self.prefetch is Prefetch.NONE or self.current is None:
            return 0
        targets = list(self.current.targets.values())
        if self.prefetch is not Prefetch.ALL:
            chosen = self._retention.wanted(targets)  # decided once for the whole pass
            targets = [t for t in targets if t.sha256 in chosen]
        wanted = [t for t in targets if not self.store.contains(t.sha256)]
        gate = asyncio.Semaphore(concurrency)
        fetched = 0

        async def one(target: Target) -> None:
            nonlocal fetched
            async with gate:
                try:
                    await self.ensure(target)
                    fetched += 1
                except StoreFullError as e:
                    logger.warning("prefetch of %s skipped: %s", target.path, e)
                except StoreError as e:
                    logger.warning("prefetch of %s failed: %s", target.path, e)

        await asyncio.gather(*(one(t) for t in wanted))
        return fetched

    async def scrub_once(self, pause: float = 0.0) -> dict[ScrubOutcome, int]:
        """One pass: re-hash every stored blob, ``pause`` seconds before each, one at a time.

        A blob being served or filled is skipped until the next pass; a quarantined
        blob that the relay keeps is fetched again at once.
        """
        counts: Counter[ScrubOutcome] = Counter()
        for sha in self.store.digests():
            if pause:
                await asyncio.sleep(pause)
            if not self.store.contains(sha) or self.store.busy(sha):
                continue
            try:
                outcome = await self.store.scrub_one(sha)
            except OSError as e:
                logger.warning("scrub of %s failed: %s", sha, e)
                continue
            counts[outcome] += 1
            self.metrics.scrub.labels(outcome.value).inc()
            if outcome is ScrubOutcome.QUARANTINED:
                await self._refetch_kept()
        return dict(counts)

    async def _refetch_kept(self) -> None:
        """Fetch again the kept blobs that are missing (after a quarantine)."""
        if self.current is None:
            return
        pins = self._retention.pins()
        for target in self.current.targets.values():
            if not self.store.contains(target.sha256) and target.sha256 in pins:
                with contextlib.suppress(StoreError):
                    await self.ensure(target)
        await self.prefetch_now()

    async def run_scrub_loop(self, interval: float, *, first_pass_after: float = 60.0) -> None:
        """Re-hash every stored blob once per ``interval``, one at a time, spread over it.

        The first pass starts ``first_pass_after`` seconds after start (not a whole
        interval later), so bytes damaged while the relay was down are found soon;
        blobs are hashed one by one with even pauses (:meth:`scrub_once`), so the
        disk is never swamped.
        """
        await asyncio.sleep(min(first_pass_after, interval))
        while True:
            stored = len(self.store.digests())
            if not stored:
                await asyncio.sleep(interval)
                continue
            await self.scrub_once(pause=interval / stored)

    async def close(self) -> None:
        """Cancel fills and background work."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await self.store.close()

"""The relay's delta service: which patches to compute, where they live, how to use a parent's.

Rules:

* Patches live in ``<data_dir>/deltas/<from sha256>/<to sha256>.<format>``; the
  index is rebuilt from that directory at start. A patch exists only once the
  worker has applied it and checked the result against the target's signed hash.
* After each new metadata generation (and its prefetch), every product's versions
  are diffed against up to ``delta.bases`` older versions whose blobs are stored, in
  every configured format. Pairs that were skipped (budget, ratio, timeout) are not
  tried again in this process.
* Between syncs, only a check-in asks for a pair (from an agent's installed version
  to the version it is offered; ``/deltas/`` requests never start work). At most
  ``max_queued`` pairs wait or run at once; past that a request is dropped and
  counted (``relay_delta_patches_total{outcome="queue_full"}``); the next check-in
  asks again. Each pair is tried once per format in a process. Nothing waits for
  a computation: the answer meanwhile is the full target.
* A child relay filling a target first asks its parent for a patch from the newest
  older version it holds, through the same :class:`relay.cache.upstream.Upstream`
  as metadata and blobs (throttle, byte counters, timeouts, retries, failover,
  health). The patch is capped at the target's signed length, applied with the
  declared size checked before and the signed sha256 after, and the blob store
  verifies the rebuilt blob again on commit; on any failure it fetches the full target.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from relay.cache.store import Fill, FsBlobStore
from relay.cache.upstream import Upstream
from relay.core.model import Target, is_sha256
from relay.core.protocol import MEDIA_TYPES, DeltaFormat
from relay.core.verify import VerifiedMetadata
from relay.deltas.engine import DeltaEngine, DeltaOutcome
from relay.deltas.formats import apply_patch_bytes
from relay.errors import (
    PatchRejectedError,
    TransportError,
    UpstreamContentError,
    UpstreamUnavailableError,
)
from relay.metrics import RelayMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PatchFile:
    """A verified patch on disk."""

    path: Path
    length: int
    format: DeltaFormat


class DeltaService:
    """Computes, indexes and serves patches; rebuilds targets from a parent's patches."""

    def __init__(
        self,
        *,
        directory: Path,
        engine: DeltaEngine,
        store: FsBlobStore,
        metrics: RelayMetrics,
        formats: Sequence[DeltaFormat],
        bases: int,
        max_queued: int = 32,
    ) -> None:
        self.directory = directory
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.formats = list(formats)
        self.bases = bases
        self.max_queued = max_queued
        self._index: dict[tuple[str, str], dict[DeltaFormat, PatchFile]] = {}
        self._tried: set[tuple[str, str, DeltaFormat]] = set()
        self._running: dict[tuple[str, str], asyncio.Task[None]] = {}
        self.current: VerifiedMetadata | None = None

    # -- index ----------------------------------------------------------------------

    async def open(self) -> None:
        """Index the patches on disk (deleting leftovers of interrupted work)."""
        self._index = await asyncio.to_thread(self._scan)

    def _scan(self) -> dict[tuple[str, str], dict[DeltaFormat, PatchFile]]:
        self.directory.mkdir(parents=True, exist_ok=True)
        index: dict[tuple[str, str], dict[DeltaFormat, PatchFile]] = {}
        for src in self.directory.iterdir():
            if not src.is_dir() or not is_sha256(src.name):
                continue
            for f in src.iterdir():
                if f.name.startswith("."):
                    with contextlib.suppress(OSError):
                        f.unlink()
                    continue
                to, _, fmt = f.name.partition(".")
                if not is_sha256(to) or fmt not in DeltaFormat.__members__.values():
                    continue
                index.setdefault((src.name, to), {})[DeltaFormat(fmt)] = PatchFile(
                    f, f.stat().st_size, DeltaFormat(fmt)
                )
        return index

    def path_for(self, src: str, dst: str, fmt: DeltaFormat) -> Path:
        """Where the patch from ``src`` to ``dst`` in ``fmt`` lives."""
        return self.directory / src / f"{dst}.{fmt}"

    def lookup(self, src: str, dst: str, accept: Sequence[DeltaFormat] | None) -> PatchFile | None:
        """The best stored patch for the pair among the formats the client accepts.

        The relay's own preference order decides among the accepted formats.
        """
        patches = self._index.get((src, dst))
        if not patches:
            return None
        for fmt in self.formats:
            if (accept is None or fmt in accept) and fmt in patches:
                return patches[fmt]
        return None

    def kept_pairs(self) -> set[tuple[str, str]]:
        """``(from, to)`` digests of every kept patch."""
        return set(self._index)

    # -- computing ---------------------------------------------------------------

    def wanted_pairs(self, verified: VerifiedMetadata) -> list[tuple[Target, Target]]:
        """(old, new) pairs to diff: each version against up to ``bases`` older ones."""
        pairs: list[tuple[Target, Target]] = []
        for versions in verified.products().values():
            for i, new in enumerate(versions):
                older = reversed(versions[max(0, i - self.bases) : i])
                pairs.extend((old, new) for old in older if old.sha256 != new.sha256)
        return pairs

    async def compute_all(self, verified: VerifiedMetadata) -> int:
        """Compute every wanted pair whose blobs are stored; return how many were made."""
        self.current = verified
        made = 0
        for old, new in self.wanted_pairs(verified):
            if self.store.contains(old.sha256) and self.store.contains(new.sha256):
                made += await self._compute_pair(old, new)
        return made

    def request(self, src: str, dst: str) -> None:
        """Start computing ``src`` to ``dst`` in the background if it makes sense."""
        verified = self.current
        if verified is None or (src, dst) in self._running:
            return
        old = verified.by_sha256.get(src)
        new = verified.by_sha256.get(dst)
        if old is None or new is None or old.product != new.product or src == dst:
            return
        if not (self.store.contains(src) and self.store.contains(dst)):
            return
        if all((src, dst, fmt) in self._tried for fmt in self.formats):
            return
        if len(self._running) >= self.max_queued:
            self.metrics.delta_patches.labels("queue_full", "").inc()
            return
        task = asyncio.create_task(self._compute_pair_task(old, new))
        self._running[src, dst] = task
        task.add_done_callback(lambda _t: self._running.pop((src, dst), None))

    async def _compute_pair_task(self, old: Target, new: Target) -> None:
        await self._compute_pair(old, new)

    async def _compute_pair(self, old: Target, new: Target) -> int:
        made = 0
        for fmt in self.formats:
            key = (old.sha256, new.sha256, fmt)
            if key in self._tried:
                continue
            self._tried.add(key)
            dest = self.path_for(old.sha256, new.sha256, fmt)
            with self.store.serving(old.sha256), self.store.serving(new.sha256):
                result = await self.engine.compute(
                    self.store.path(old.sha256),
                    self.store.path(new.sha256),
                    fmt=fmt,
                    new_sha256=new.sha256,
                    new_length=new.length,
                    old_sha256=old.sha256,
                    dest=dest,
                )
            self.metrics.delta_patches.labels(result.outcome.value, str(fmt)).inc()
            self.metrics.delta_seconds.labels(str(fmt)).inc(result.seconds)
            if result.outcome is DeltaOutcome.COMPUTED and result.patch_path is not None:
                self._index.setdefault((old.sha256, new.sha256), {})[fmt] = PatchFile(
                    result.patch_path, result.patch_length, fmt
                )
                made += 1
                logger.info(
                    "delta %s %s -> %s: %d bytes (%.1f%% of %d) in %.2f s",
                    fmt,
                    old.version,
                    new.version,
                    result.patch_length,
                    100 * result.patch_length / max(1, new.length),
                    new.length,
                    result.seconds,
                )
            else:
                logger.info(
                    "delta %s %s -> %s %s: %s",
                    fmt,
                    old.version,
                    new.version,
                    result.outcome.value,
                    result.detail,
                )
        return made

    # -- relay to relay ------------------------------------------------------------

    async def fill_from_parent(
        self,
        target: Target,
        fill: Fill,
        upstream: Upstream,
        verified: VerifiedMetadata | None,
    ) -> bool:
        """Try to rebuild ``target`` from a parent's patch into ``fill``.

        The patch is asked of ``upstream`` (the relay's parents, in health order),
        from the newest older version of the product whose blob is stored.

        Args:
            target: the target to fill.
            fill: the blob store's fill for it (still empty).
            upstream: the relay's upstreams (parent relays serve ``deltas/``).
            verified: the metadata in force (``None``: nothing to patch from).

        Returns:
            True when the fill now holds the whole target (the store still verifies
            it on commit); False when the caller must fetch the full target.

        Raises:
            StoreError: ``fill`` no longer accepts writes (as :meth:`Fill.write`);
                a missing, unreachable or refused patch is no error: it returns
                False (a refused one is counted in ``relay_delta_rejected_total``).
            OSError: the rebuilt target cannot be written.
        """
        if verified is None or fill.written:
            return False
        older = [
            t
            for t in verified.products().get(target.product, [])
            if t.info.semver < target.info.semver and self.store.contains(t.sha256)
        ]
        if not older:
            return False
        old = older[-1]
        accept = ", ".join(MEDIA_TYPES[f] for f in self.formats)
        try:
            patch, headers = await upstream.fetch_bytes(
                f"deltas/{old.sha256}/{target.sha256}",
                max_length=target.length,  # a larger patch is never worth it
                headers={"Accept": accept},
            )
            fmt = DeltaFormat(headers.get("Relay-Delta-Format", ""))
            if headers.get("Relay-Target-Sha256") != target.sha256 or headers.get(
                "Relay-Target-Length"
            ) != str(target.length):
                raise PatchRejectedError("patch headers name another target")
            old_bytes = await asyncio.to_thread(self.store.path(old.sha256).read_bytes)
            data = await asyncio.to_thread(
                apply_patch_bytes,
                old_bytes,
                patch,
                fmt,
                expected_length=target.length,
                expected_sha256=target.sha256,
            )
        except UpstreamUnavailableError as e:
            if any(isinstance(c, UpstreamContentError) for c in e.causes):
                self.metrics.delta_rejected.labels("parent_patch").inc()  # larger than the target
            logger.info("parent delta for %s unavailable: %s", target.path, e)
            return False
        except (TransportError, ValueError, OSError) as e:
            logger.info("parent delta for %s unavailable: %s", target.path, e)
            return False
        except PatchRejectedError as e:
            self.metrics.delta_rejected.labels("parent_patch").inc()
            logger.warning("parent delta for %s rejected: %s", target.path, e)
            return False
        view = memoryview(data)
        for offset in range(0, len(view), 1024 * 1024):
            await fill.write(bytes(view[offset : offset + 1024 * 1024]))
        self.metrics.delta_wan_saved.inc(target.length - len(patch))
        logger.info("rebuilt %s from a %d-byte parent patch", target.path, len(patch))
        return True

    async def close(self) -> None:
        """Stop computations."""
        for task in list(self._running.values()):
            task.cancel()
        await self.engine.close()

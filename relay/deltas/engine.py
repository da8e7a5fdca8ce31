"""The diff engine: one spawned process per diff, with memory, time and size limits.

Rules:

* Diffs run in a child process each (``spawn``), at most ``workers`` at a time. A
  diff past ``max_seconds`` is killed (so is one whose caller is cancelled); the
  next one starts fresh. The child's address space is capped near ``max_memory``.
* A pair whose estimated memory is over budget is skipped before starting; a patch
  larger than ``max_ratio`` of the target is dropped.
* The child decodes its own patch and hashes the result against the target's
  signed sha256 before the patch is moved into place: a patch that exists has
  been checked (the formats themselves are in :mod:`relay.deltas.formats`).
* The event loop only watches children; it never runs a diff, a patch or a hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import resource
import time
from dataclasses import dataclass
from enum import StrEnum, auto
from pathlib import Path
from typing import Any

from relay.config import DeltaSettings
from relay.core.protocol import DeltaFormat
from relay.deltas.formats import decode_patch, make_patch
from relay.storage.fsio import write_atomic


class DeltaOutcome(StrEnum):
    """What became of one requested diff."""

    COMPUTED = auto()
    IDENTICAL = auto()
    SKIPPED_MEMORY = auto()
    SKIPPED_RATIO = auto()
    TIMEOUT = auto()
    FAILED = auto()


@dataclass(frozen=True, slots=True)
class DeltaBudget:
    """Limits of one diff."""

    max_memory: int = 2 * 1024**3  # bytes, estimated peak of one diff (see estimate_memory)
    max_seconds: float = 300.0  # wall seconds of one diff, then the child is killed
    max_ratio: float = 0.5  # patch length / target length above which the patch is dropped
    zstd_level: int = 3  # RESULTS.md: level 19 is ~100x slower, 4x larger on text

    @classmethod
    def from_settings(cls, settings: DeltaSettings) -> DeltaBudget:
        """The limits the ``[delta]`` settings give.

        Args:
            settings: the validated ``[delta]`` section.

        Returns:
            The budget of one diff.

        Raises:
            Nothing: the settings are already validated.
        """
        return cls(
            max_memory=settings.max_memory,
            max_seconds=settings.max_seconds,
            max_ratio=settings.max_ratio,
            zstd_level=settings.zstd_level,
        )


@dataclass(frozen=True, slots=True)
class DeltaResult:
    """The outcome of one diff; only ``COMPUTED`` has a file at ``patch_path``."""

    outcome: DeltaOutcome
    format: DeltaFormat
    patch_path: Path | None = None
    patch_length: int = 0  # bytes; also set for SKIPPED_RATIO (the dropped patch's length)
    patch_sha256: str = ""
    seconds: float = 0.0  # wall time of the child, start to exit (or kill)
    detail: str = ""


BSDIFF_FACTOR = 18  # NOTES: bsdiff4 needs about 18x the old file (suffix array) ...
_BASELINE = 256 * 1024**2  # ... plus the interpreter and its libraries in the child


def estimate_memory(fmt: DeltaFormat, old_length: int, new_length: int) -> int:
    """Estimated peak memory of one diff in its child process, in bytes.

    bsdiff4 builds a suffix array over the old file (about 18x its size, measured
    on real libraries and text: NOTES.md, benchmarks/RESULTS.md) and holds both
    files and the patch. zstd with a raw prefix holds both files, the output and
    the compressor's window and match tables; the window is up to twice the larger
    file (``window_log`` rounds up), so it is counted as 4x the larger file, which
    is above every peak measured at level 3 (126 MB for a 33 MB pair). Both add a
    fixed 256 MiB for the interpreter. This is an estimate to skip hopeless pairs,
    not a bound: the child's address space is also capped (see :class:`DeltaEngine`).

    Args:
        fmt: the patch format.
        old_length: bytes of the old file.
        new_length: bytes of the new file.

    Returns:
        Estimated peak bytes.

    Raises:
        ValueError: a length is negative.
    """
    if old_length < 0 or new_length < 0:
        raise ValueError(f"negative length: old {old_length}, new {new_length}")
    if fmt is DeltaFormat.BSDIFF4:
        return BSDIFF_FACTOR * old_length + 2 * new_length + _BASELINE
    return old_length + 4 * max(old_length, new_length) + _BASELINE


# -- the worker process -----------------------------------------------------------


def _child(job: dict[str, Any]) -> None:  # pragma: no cover - runs in the child process
    """Compute, verify and place one patch; write a JSON result beside it."""
    result_path = Path(job["result"])
    result: dict[str, Any]
    try:
        limit = int(job["memory_limit"])
        if limit > 0:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        old = Path(job["old"]).read_bytes()
        new = Path(job["new"]).read_bytes()
        fmt = DeltaFormat(job["format"])
        patch = make_patch(old, new, fmt, int(job["level"]))
        del new
        if len(patch) > float(job["max_ratio"]) * int(job["new_length"]):
            result = {"outcome": DeltaOutcome.SKIPPED_RATIO.value, "length": len(patch)}
        else:
            # Applied once and hashed before it is published (not trusting our own diff).
            decode_patch(
                old,
                patch,
                fmt,
                expected_length=int(job["new_length"]),
                expected_sha256=job["new_sha256"],
                write=lambda _b: None,
            )
            write_atomic(Path(job["dest"]), patch)
            result = {
                "outcome": DeltaOutcome.COMPUTED.value,
                "length": len(patch),
                "sha256": hashlib.sha256(patch).hexdigest(),
            }
    except MemoryError:
        result = {"outcome": DeltaOutcome.FAILED.value, "detail": "out of memory"}
    except Exception as e:  # reported to the parent, which counts it
        result = {"outcome": DeltaOutcome.FAILED.value, "detail": f"{type(e).__name__}: {e}"}
    write_atomic(result_path, json.dumps(result).encode())


class DeltaEngine:
    """Runs diffs in child processes, at most ``workers`` at a time.

    Each diff is a fresh ``spawn``-ed process rather than a pool worker, so that a
    diff past its time budget can be killed without harming the others. Its address
    space is capped (``RLIMIT_AS``) at the memory budget plus 512 MiB.

    Args:
        workers: concurrent diffs (at least 1).
        budget: memory, time and size limits.
    """

    def __init__(self, *, workers: int = 1, budget: DeltaBudget | None = None) -> None:
        self.budget = budget or DeltaBudget()
        self.workers = max(1, workers)
        self._gate: asyncio.Semaphore | None = None  # made on the loop that uses it
        self._running: set[multiprocessing.process.BaseProcess] = set()
        self._ctx = multiprocessing.get_context("spawn")
        self._closed = False

    @property
    def running(self) -> int:
        """Diffs running now (child processes started and not yet reaped)."""
        return len(self._running)

    async def compute(
        self,
        old: Path,
        new: Path,
        *,
        fmt: DeltaFormat,
        new_sha256: str,
        new_length: int,
        old_sha256: str = "",
        dest: Path,
    ) -> DeltaResult:
        """Compute a verified patch from ``old`` to ``new`` into ``dest``.

        Args:
            old: the base file (verified).
            new: the target file (verified).
            fmt: the patch format.
            new_sha256: the target's signed sha256; the patch is applied and its
                result checked against it before ``dest`` is written.
            new_length: the target's signed length.
            old_sha256: the base's sha256; equal to ``new_sha256`` means identical.
            dest: where the patch goes (its directory is created).

        Returns:
            The result; only :attr:`DeltaOutcome.COMPUTED` leaves a file at ``dest``.

        Raises:
            OSError: ``old`` cannot be read, or ``dest``'s directory cannot be made.
        """
        if old_sha256 and old_sha256 == new_sha256:
            return DeltaResult(DeltaOutcome.IDENTICAL, fmt, detail="same sha256")
        old_length = (await asyncio.to_thread(old.stat)).st_size
        need = estimate_memory(fmt, old_length, new_length)
        if need > self.budget.max_memory:
            return DeltaResult(
                DeltaOutcome.SKIPPED_MEMORY,
                fmt,
                detail=f"needs about {need} bytes, budget {self.budget.max_memory}",
            )
        job = {
            "old": str(old),
            "new": str(new),
            "format": str(fmt),
            "dest": str(dest),
            "result": str(dest.with_name(f".{dest.name}.result")),
            "level": self.budget.zstd_level,
            "max_ratio": self.budget.max_ratio,
            "new_length": new_length,
            "new_sha256": new_sha256,
            "memory_limit": self.budget.max_memory + 2 * _BASELINE,
        }
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.workers)
        async with self._gate:
            if self._closed:
                return DeltaResult(DeltaOutcome.FAILED, fmt, detail="engine closed")
            return await self._run(job, fmt, dest)

    async def _run(self, job: dict[str, Any], fmt: DeltaFormat, dest: Path) -> DeltaResult:
        """Run one diff's child (``job`` is what :func:`_child` reads) and collect its result."""
        result_file = Path(job["result"])
        await asyncio.to_thread(self._prepare, dest, result_file)
        proc = self._ctx.Process(target=_child, args=(job,), daemon=True)
        started = time.monotonic()
        self._running.add(proc)
        start = asyncio.ensure_future(asyncio.to_thread(proc.start))
        try:
            await asyncio.shield(start)
            timed_out = not await self._wait(proc, self.budget.max_seconds)
        except BaseException:  # cancelled: the diff has no one to report to
            await asyncio.shield(self._abandon(start, proc, dest, result_file))
            raise
        seconds = time.monotonic() - started
        if timed_out:
            await asyncio.to_thread(self._kill, proc, dest, result_file)
            self._running.discard(proc)
            return DeltaResult(
                DeltaOutcome.TIMEOUT,
                fmt,
                seconds=seconds,
                detail=f"killed after {self.budget.max_seconds} s",
            )
        await asyncio.to_thread(proc.join)
        self._running.discard(proc)
        data = await asyncio.to_thread(self._read_result, result_file)
        outcome = DeltaOutcome(data.get("outcome", DeltaOutcome.FAILED.value))
        if outcome is not DeltaOutcome.COMPUTED:
            await asyncio.to_thread(self._cleanup, dest, result_file)
            detail = data.get("detail", "")
            if not detail and outcome is DeltaOutcome.FAILED:
                detail = f"worker exited with code {proc.exitcode}"
            if outcome is DeltaOutcome.SKIPPED_RATIO:
                detail = (
                    f"patch {data['length']} bytes > {self.budget.max_ratio} x {job['new_length']}"
                )
            return DeltaResult(
                outcome,
                fmt,
                seconds=seconds,
                patch_length=int(data.get("length", 0)),
                detail=detail,
            )
        return DeltaResult(
            outcome,
            fmt,
            patch_path=dest,
            patch_length=int(data["length"]),
            patch_sha256=str(data["sha256"]),
            seconds=seconds,
        )

    async def _abandon(
        self,
        start: asyncio.Future[None],
        proc: multiprocessing.process.BaseProcess,
        dest: Path,
        result_file: Path,
    ) -> None:
        with contextlib.suppress(Exception):
            await start  # a kill before the start completes would miss the child
        await asyncio.to_thread(self._kill, proc, dest, result_file)
        self._running.discard(proc)

    @staticmethod
    async def _wait(proc: multiprocessing.process.BaseProcess, timeout: float) -> bool:
        """Wait for ``proc`` to exit, at most ``timeout`` s; True if it did.

        The process's sentinel becomes readable when it exits: the loop watches it
        instead of polling.
        """
        loop = asyncio.get_running_loop()
        exited = asyncio.Event()
        loop.add_reader(proc.sentinel, exited.set)
        try:
            async with asyncio.timeout(timeout):
                await exited.wait()
        except TimeoutError:
            return not proc.is_alive()
        finally:
            loop.remove_reader(proc.sentinel)
        return True

    @staticmethod
    def _prepare(dest: Path, result_file: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            result_file.unlink()

    @staticmethod
    def _read_result(result_file: Path) -> dict[str, Any]:
        try:
            data = json.loads(result_file.read_text())
        except (OSError, ValueError):
            data = {}
        with contextlib.suppress(FileNotFoundError):
            result_file.unlink()
        return data if isinstance(data, dict) else {}

    @staticmethod
    def _cleanup(dest: Path, result_file: Path) -> None:
        for p in (
            dest,
            dest.with_name(f".{dest.name}.tmp"),
            result_file,
            result_file.with_name(f".{result_file.name}.tmp"),
        ):
            with contextlib.suppress(OSError):
                p.unlink()

    @classmethod
    def _kill(
        cls, proc: multiprocessing.process.BaseProcess, dest: Path, result_file: Path
    ) -> None:
        if proc.pid is not None:  # started
            proc.kill()
            proc.join()
        cls._cleanup(dest, result_file)

    async def close(self) -> None:
        """Refuse new diffs, kill the running ones and reap them.

        Their callers get :attr:`DeltaOutcome.FAILED` (the child died without a result).

        Raises:
            Nothing: errors while killing are ignored (the child may already be gone).
        """
        self._closed = True
        procs = [p for p in self._running if p.pid is not None]
        for proc in procs:
            with contextlib.suppress(OSError, ValueError):
                proc.kill()
        for proc in procs:
            with contextlib.suppress(OSError, ValueError):
                await asyncio.to_thread(proc.join)

"""Binary deltas: computing patches in worker processes, and applying them safely.

Rules:

* Nobody signs a delta. Whoever applies one checks, *before* applying, that the
  size the patch declares for its output is the full target's signed length, and
  *after*, that the output's sha256 is the signed one (DESIGN §1). A patch failing
  either check raises :class:`relay.errors.PatchRejectedError` and no output file
  is created.
* Two formats: ``bsdiff4`` (its header carries the new size), and ``zstd`` with the
  old file as a raw prefix, the same as ``zstd --patch-from`` (``window_log`` >=
  log2 of the larger file, long-distance matching, the content size always written
  in the frame header).
* Diffs run in a child process each (``spawn``), at most ``workers`` at a time. A
  diff past ``max_seconds`` is killed; the next one starts fresh. The child's
  address space is capped near ``max_memory``. A pair whose estimated memory is
  over budget is skipped before starting; a patch larger than ``max_ratio`` of the
  target is dropped. The child applies its own patch and hashes the result before
  the patch is moved into place.
* The event loop only polls children; it never runs a diff, a patch or a hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import multiprocessing
import sys
import time
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

import bsdiff4

from relay._internal.fsio import write_atomic
from relay.errors import PatchRejectedError

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd


class DeltaFormat(StrEnum):
    """Patch formats."""

    BSDIFF4 = "bsdiff4"
    ZSTD = "zstd"


MEDIA_TYPES = {
    DeltaFormat.BSDIFF4: "application/vnd.relay.bsdiff4",
    DeltaFormat.ZSTD: "application/vnd.relay.zstd-patch",
}


class DeltaOutcome(Enum):
    """What became of one requested diff."""

    COMPUTED = "computed"
    IDENTICAL = "identical"
    SKIPPED_MEMORY = "skipped_memory"
    SKIPPED_RATIO = "skipped_ratio"
    TIMEOUT = "timeout"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class DeltaBudget:
    """Limits of one diff."""

    max_memory: int = 2 * 1024**3  # bytes
    max_seconds: float = 300.0
    max_ratio: float = 0.5
    zstd_level: int = 3


@dataclass(frozen=True, slots=True)
class DeltaResult:
    """The outcome of one diff."""

    outcome: DeltaOutcome
    format: DeltaFormat
    patch_path: Path | None = None
    patch_length: int = 0
    patch_sha256: str = ""
    seconds: float = 0.0
    detail: str = ""


BSDIFF_FACTOR = 18  # NOTES: bsdiff4 needs about 18x the old file (suffix array) ...
_BASELINE = 256 * 1024**2  # ... plus the interpreter itself


def estimate_memory(fmt: DeltaFormat, old_length: int, new_length: int) -> int:
    """Estimated peak memory of a diff, in bytes.

    bsdiff4 builds a suffix array over the old file (about 18x its size, measured)
    and holds both files and the patch. zstd with a raw prefix holds both files, the
    match-finder tables of a window as large as the larger file (about 2x it at
    high levels) and the output.
    """
    if fmt is DeltaFormat.BSDIFF4:
        return BSDIFF_FACTOR * old_length + 2 * new_length + _BASELINE
    return old_length + 4 * max(old_length, new_length) + _BASELINE


def _window_log(old_length: int, new_length: int) -> int:
    size = max(old_length, new_length, 1)
    return max(10, min(31, math.ceil(math.log2(size)) + 1))


# -- pure format code -----------------------------------------------------------


def make_patch(old: bytes, new: bytes, fmt: DeltaFormat, level: int = 3) -> bytes:
    """Return a patch turning ``old`` into ``new`` (blocking, CPU-bound)."""
    if fmt is DeltaFormat.BSDIFF4:
        return bytes(bsdiff4.diff(old, new))
    wl = _window_log(len(old), len(new))
    params: dict[int, int] = {
        zstd.CompressionParameter.compression_level: level,
        zstd.CompressionParameter.window_log: wl,
        zstd.CompressionParameter.enable_long_distance_matching: 1,
    }
    prefix = zstd.ZstdDict(old, is_raw=True)
    comp = zstd.ZstdCompressor(options=params, zstd_dict=prefix.as_prefix)
    comp.set_pledged_input_size(len(new))  # the frame header then declares the size
    return comp.compress(new, mode=zstd.ZstdCompressor.FLUSH_FRAME)


def _offtin(buf: bytes) -> int:
    # bsdiff's sign-magnitude little-endian 64-bit integer.
    value = int.from_bytes(buf[:8], "little")
    if value & (1 << 63):
        return -(value & ((1 << 63) - 1))
    return value


def declared_output_size(patch_head: bytes, fmt: DeltaFormat) -> int:
    """The output size a patch declares in its header.

    Raises:
        PatchRejectedError: the header is not a valid header of ``fmt``.
    """
    if fmt is DeltaFormat.BSDIFF4:
        if len(patch_head) < 32 or patch_head[:8] != b"BSDIFF40":
            raise PatchRejectedError("not a bsdiff4 patch (bad magic or short header)")
        size = _offtin(patch_head[24:32])
        if size < 0:
            raise PatchRejectedError("bsdiff4 header declares a negative size")
        return size
    try:
        info = zstd.get_frame_info(patch_head)
    except zstd.ZstdError as e:
        raise PatchRejectedError(f"not a zstd patch: {e}") from None
    if info.decompressed_size is None:
        raise PatchRejectedError("zstd patch does not declare its output size")
    return int(info.decompressed_size)


def check_declared_size(patch_head: bytes, fmt: DeltaFormat, expected_length: int) -> None:
    """Refuse a patch whose header declares another output size than the signed length.

    Raises:
        PatchRejectedError: the header is malformed or declares another size.
    """
    declared = declared_output_size(patch_head, fmt)
    if declared != expected_length:
        raise PatchRejectedError(
            f"patch declares {declared} bytes of output, the signed length is {expected_length}"
        )


def apply_patch_bytes(
    old: bytes, patch: bytes, fmt: DeltaFormat, *, expected_length: int, expected_sha256: str
) -> bytes:
    """Apply ``patch`` to ``old`` and verify the result (blocking).

    Raises:
        PatchRejectedError: the declared size is not ``expected_length`` (checked
            before applying), the patch is malformed, or the result's length or
            sha256 is wrong.
    """
    check_declared_size(patch[:64], fmt, expected_length)
    try:
        if fmt is DeltaFormat.BSDIFF4:
            out = bytes(bsdiff4.patch(old, patch))
        else:
            wl = _window_log(len(old), expected_length)
            prefix = zstd.ZstdDict(old, is_raw=True)
            dec = zstd.ZstdDecompressor(
                zstd_dict=prefix.as_prefix,
                options={zstd.DecompressionParameter.window_log_max: wl},
            )
            out = dec.decompress(patch, max_length=expected_length + 1)
            if not dec.eof:
                raise PatchRejectedError("zstd patch is truncated or longer than declared")
    except PatchRejectedError:
        raise
    except (ValueError, zstd.ZstdError, MemoryError, OverflowError) as e:
        raise PatchRejectedError(f"{fmt} patch cannot be applied: {e}") from None
    if len(out) != expected_length:
        raise PatchRejectedError(f"patched output is {len(out)} bytes, signed {expected_length}")
    observed = hashlib.sha256(out).hexdigest()
    if observed != expected_sha256:
        raise PatchRejectedError(f"patched output hashes to {observed}, signed {expected_sha256}")
    return out


def apply_patch_file(
    old: Path,
    patch: Path,
    out: Path,
    *,
    fmt: DeltaFormat,
    expected_length: int,
    expected_sha256: str,
) -> None:
    """Apply a patch file to a verified old file; write ``out`` atomically (blocking).

    The declared size is read from the patch's header and compared with the signed
    length before anything large is read or allocated.

    Raises:
        PatchRejectedError: as :func:`apply_patch_bytes`; ``out`` is not created.
        OSError: a file cannot be read or written.
    """
    with patch.open("rb") as f:
        check_declared_size(f.read(64), fmt, expected_length)
    result = apply_patch_bytes(
        old.read_bytes(),
        patch.read_bytes(),
        fmt,
        expected_length=expected_length,
        expected_sha256=expected_sha256,
    )
    write_atomic(out, result)


async def apply_patch(
    old: Path,
    patch: Path,
    out: Path,
    *,
    fmt: DeltaFormat,
    expected_length: int,
    expected_sha256: str,
) -> None:
    """:func:`apply_patch_file` in a thread (bsdiff4 and zstd release the GIL).

    Raises:
        PatchRejectedError: as :func:`apply_patch_file`.
    """
    await asyncio.to_thread(
        apply_patch_file,
        old,
        patch,
        out,
        fmt=fmt,
        expected_length=expected_length,
        expected_sha256=expected_sha256,
    )


# -- the worker process -----------------------------------------------------------


def _child(job: dict[str, Any]) -> None:  # pragma: no cover - runs in the child process
    """Compute, verify and place one patch; write a JSON result next to it."""
    import resource  # noqa: PLC0415 - only in the child

    result_path = Path(job["result"])
    try:
        limit = int(job["memory_limit"])
        if limit > 0:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        old = Path(job["old"]).read_bytes()
        new = Path(job["new"]).read_bytes()
        fmt = DeltaFormat(job["format"])
        patch = make_patch(old, new, fmt, int(job["level"]))
        if len(patch) > float(job["max_ratio"]) * len(new):
            result_path.write_text(json.dumps({"outcome": "skipped_ratio", "length": len(patch)}))
            return
        apply_patch_bytes(
            old,
            patch,
            fmt,
            expected_length=int(job["new_length"]),
            expected_sha256=job["new_sha256"],
        )
        write_atomic(Path(job["dest"]), patch)
        result_path.write_text(
            json.dumps(
                {
                    "outcome": "computed",
                    "length": len(patch),
                    "sha256": hashlib.sha256(patch).hexdigest(),
                }
            )
        )
    except MemoryError:
        result_path.write_text(json.dumps({"outcome": "failed", "detail": "out of memory"}))
    except Exception as e:
        result_path.write_text(
            json.dumps({"outcome": "failed", "detail": f"{type(e).__name__}: {e}"})
        )


class DeltaEngine:
    """Runs diffs in child processes, at most ``workers`` at a time.

    Args:
        workers: concurrent diffs.
        budget: memory, time and size limits.
    """

    def __init__(self, *, workers: int = 1, budget: DeltaBudget | None = None) -> None:
        self.budget = budget or DeltaBudget()
        self._workers = max(1, workers)
        self._gate: asyncio.Semaphore | None = None
        self._running: set[multiprocessing.process.BaseProcess] = set()
        self._ctx = multiprocessing.get_context("spawn")
        self._closed = False

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
        """Compute a patch from ``old`` to ``new`` into ``dest``.

        Returns:
            The result; only :attr:`DeltaOutcome.COMPUTED` leaves a file at ``dest``.
        """
        if old_sha256 and old_sha256 == new_sha256:
            return DeltaResult(DeltaOutcome.IDENTICAL, fmt)
        old_length = (await asyncio.to_thread(old.stat)).st_size
        need = estimate_memory(fmt, old_length, new_length)
        if need > self.budget.max_memory:
            return DeltaResult(
                DeltaOutcome.SKIPPED_MEMORY,
                fmt,
                detail=f"needs about {need} bytes, budget {self.budget.max_memory}",
            )
        if self._gate is None:
            self._gate = asyncio.Semaphore(self._workers)
        async with self._gate:
            return await self._run(old, new, fmt, new_sha256, new_length, dest)

    async def _run(
        self,
        old: Path,
        new: Path,
        fmt: DeltaFormat,
        new_sha256: str,
        new_length: int,
        dest: Path,
    ) -> DeltaResult:
        if self._closed:
            return DeltaResult(DeltaOutcome.FAILED, fmt, detail="engine closed")
        result_file = dest.with_name(f".{dest.name}.result")
        await asyncio.to_thread(self._prepare, dest, result_file)
        job = {
            "old": str(old),
            "new": str(new),
            "format": str(fmt),
            "dest": str(dest),
            "result": str(result_file),
            "level": self.budget.zstd_level,
            "max_ratio": self.budget.max_ratio,
            "new_length": new_length,
            "new_sha256": new_sha256,
            "memory_limit": self.budget.max_memory + 2 * _BASELINE,
        }
        proc = self._ctx.Process(target=_child, args=(job,), daemon=True)
        started = time.monotonic()
        await asyncio.to_thread(proc.start)
        self._running.add(proc)
        deadline = started + self.budget.max_seconds
        try:
            while proc.is_alive():
                if time.monotonic() > deadline:
                    proc.kill()
                    await asyncio.to_thread(proc.join, 5)
                    await asyncio.to_thread(self._cleanup, dest, result_file)
                    return DeltaResult(
                        DeltaOutcome.TIMEOUT,
                        fmt,
                        seconds=time.monotonic() - started,
                        detail=f"killed after {self.budget.max_seconds} s",
                    )
                await asyncio.sleep(0.02)
        finally:
            self._running.discard(proc)
        seconds = time.monotonic() - started
        await asyncio.to_thread(proc.join)
        try:
            data = json.loads(await asyncio.to_thread(result_file.read_text))
        except (OSError, ValueError):
            await asyncio.to_thread(self._cleanup, dest, result_file)
            return DeltaResult(
                DeltaOutcome.FAILED,
                fmt,
                seconds=seconds,
                detail=f"worker exited with code {proc.exitcode}",
            )
        finally:
            await asyncio.to_thread(self._cleanup_result, result_file)
        outcome = DeltaOutcome(data["outcome"])
        if outcome is not DeltaOutcome.COMPUTED:
            await asyncio.to_thread(self._cleanup, dest, result_file)
            return DeltaResult(
                outcome,
                fmt,
                seconds=seconds,
                patch_length=data.get("length", 0),
                detail=data.get("detail", ""),
            )
        return DeltaResult(
            outcome,
            fmt,
            patch_path=dest,
            patch_length=int(data["length"]),
            patch_sha256=str(data["sha256"]),
            seconds=seconds,
        )

    @staticmethod
    def _prepare(dest: Path, result_file: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            result_file.unlink()

    @staticmethod
    def _cleanup_result(result_file: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            result_file.unlink()

    @staticmethod
    def _cleanup(dest: Path, result_file: Path) -> None:
        for p in (dest, dest.with_name(f".{dest.name}.tmp"), result_file):
            with contextlib.suppress(OSError):
                p.unlink()

    async def close(self) -> None:
        """Kill running diffs."""
        self._closed = True
        for proc in list(self._running):
            with contextlib.suppress(Exception):
                proc.kill()

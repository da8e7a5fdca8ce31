"""Binary deltas: computing patches in worker processes, and applying them safely.

Rules:

* Nobody signs a delta. Whoever applies one checks, *before* applying, that the
  size the patch declares for its output is the full target's signed length, and
  *after*, that the output's sha256 is the signed one (DESIGN §1). A patch failing
  either check raises :class:`relay.errors.PatchRejectedError` and no output file
  is created.
* Applying never trusts a size inside the patch beyond the signed length: the
  output is produced in bounded steps (zstd: ``max_length``; bsdiff4: its three
  bzip2 blocks are decompressed only as far as its control data needs, never past
  the signed length), so a decompression bomb is refused after at most the signed
  length of output, and memory stays about old file + patch + one step.
* Two formats: ``bsdiff4`` (its header carries the new size), and ``zstd`` with the
  old file as a raw prefix, the same as ``zstd --patch-from`` (``window_log`` >=
  log2 of the larger file, long-distance matching, the content size always written
  in the frame header).
* Diffs run in a child process each (``spawn``), at most ``workers`` at a time. A
  diff past ``max_seconds`` is killed (so is one whose caller is cancelled); the
  next one starts fresh. The child's address space is capped near ``max_memory``.
  A pair whose estimated memory is over budget is skipped before starting; a patch
  larger than ``max_ratio`` of the target is dropped. The child applies its own
  patch and hashes the result before the patch is moved into place.
* The event loop only polls children; it never runs a diff, a patch or a hash.
"""

from __future__ import annotations

import asyncio
import bz2
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import bsdiff4
import bsdiff4.core

from relay.core.protocol import DeltaFormat
from relay.errors import PatchRejectedError
from relay.storage.fsio import write_atomic

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd


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

    max_memory: int = 2 * 1024**3  # bytes, estimated peak of one diff (see estimate_memory)
    max_seconds: float = 300.0  # wall seconds of one diff, then the child is killed
    max_ratio: float = 0.5  # patch length / target length above which the patch is dropped
    zstd_level: int = 3  # RESULTS.md: level 19 is ~100x slower, 4x larger on text


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
_HEAD = 64  # bytes: enough for a bsdiff4 header (32) and any zstd frame header (<= 18)
_STEP = 16 * 1024**2  # output bytes produced per step when applying
_BATCH_TUPLES = 65536  # bsdiff4 control triples read and applied per step
_PATCH_SLACK = 64 * 1024  # a patch longer than the target plus this is never worth applying
_BSDIFF_HEADER = struct.Struct("<8sQQQ")
_CONTROL = struct.Struct("<QQQ")
_SIGN = 1 << 63
_ZSTD_MIN_PREFIX = 8  # bytes: zstd refuses a shorter dictionary


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


def _window_log(old_length: int, new_length: int) -> int:
    # --patch-from needs the whole old file inside the window: log2 of the larger
    # file, plus one so the new data fits beside the prefix.
    size = max(old_length, new_length, 1)
    return max(10, min(31, math.ceil(math.log2(size)) + 1))


def _prefix(old: bytes) -> Any:  # noqa: ANN401 - the zstd module's (dict, mode) pair
    # So short an old file is no help anyway, and both sides know its length: both
    # leave it out.
    return zstd.ZstdDict(old, is_raw=True).as_prefix if len(old) >= _ZSTD_MIN_PREFIX else None


# -- making patches ---------------------------------------------------------------


def make_patch(old: bytes, new: bytes, fmt: DeltaFormat, level: int = 3) -> bytes:
    """Return a patch turning ``old`` into ``new`` (blocking, CPU-bound).

    Args:
        old: the base version.
        new: the version the patch produces.
        fmt: the patch format.
        level: zstd compression level (ignored for bsdiff4).

    Returns:
        The patch. Its header declares ``len(new)`` as the output size.

    Raises:
        MemoryError: the diff does not fit in memory.
    """
    if fmt is DeltaFormat.BSDIFF4:
        return bytes(bsdiff4.diff(old, new))
    wl = _window_log(len(old), len(new))
    params: dict[int, int] = {
        zstd.CompressionParameter.compression_level: level,
        zstd.CompressionParameter.window_log: wl,
        zstd.CompressionParameter.enable_long_distance_matching: 1,
    }
    comp = zstd.ZstdCompressor(options=params, zstd_dict=_prefix(old))
    comp.set_pledged_input_size(len(new))  # the frame header then declares the size
    return comp.compress(new, mode=zstd.ZstdCompressor.FLUSH_FRAME)


# -- reading headers ---------------------------------------------------------------


def _offtin(value: int) -> int:
    # bsdiff's sign-magnitude 64-bit integer (already read as unsigned little-endian).
    return -(value & (_SIGN - 1)) if value & _SIGN else value


def _offtout(value: int) -> int:
    return (-value) | _SIGN if value < 0 else value


def _bsdiff_header(patch_head: bytes) -> tuple[int, int, int]:
    if len(patch_head) < _BSDIFF_HEADER.size:
        raise PatchRejectedError(f"bsdiff4 header is {len(patch_head)} bytes, needs 32")
    magic, *fields = _BSDIFF_HEADER.unpack_from(patch_head)
    if magic != b"BSDIFF40":
        raise PatchRejectedError(f"not a bsdiff4 patch (magic {magic!r})")
    control, diff, size = (_offtin(v) for v in fields)
    if min(control, diff, size) < 0:
        raise PatchRejectedError(f"bsdiff4 header has a negative length: {control} {diff} {size}")
    return control, diff, size


def declared_output_size(patch_head: bytes, fmt: DeltaFormat) -> int:
    """The output size a patch declares in its header.

    Args:
        patch_head: the first bytes of the patch (64 are always enough).
        fmt: the patch format.

    Returns:
        The declared output size in bytes.

    Raises:
        PatchRejectedError: the header is not a valid header of ``fmt``, or (zstd)
            does not declare a content size.
    """
    if fmt is DeltaFormat.BSDIFF4:
        return _bsdiff_header(patch_head)[2]
    try:
        info = zstd.get_frame_info(patch_head)
    except zstd.ZstdError as e:
        raise PatchRejectedError(f"not a zstd patch: {e}") from None
    if info.decompressed_size is None:
        raise PatchRejectedError("zstd patch does not declare its output size")
    return int(info.decompressed_size)


def check_declared_size(patch_head: bytes, fmt: DeltaFormat, expected_length: int) -> None:
    """Refuse a patch whose header declares another output size than the signed length.

    Args:
        patch_head: the first bytes of the patch (64 are always enough).
        fmt: the patch format.
        expected_length: the full target's signed length.

    Raises:
        PatchRejectedError: the header is malformed or declares another size.
    """
    declared = declared_output_size(patch_head, fmt)
    if declared != expected_length:
        raise PatchRejectedError(
            f"patch declares {declared} bytes of output, the signed length is {expected_length}"
        )


# -- applying, in bounded steps ------------------------------------------------------


class _Output:
    """Receives output steps: counts them against the signed length, hashes them."""

    def __init__(self, expected_length: int, write: Callable[[bytes], object]) -> None:
        self.expected_length = expected_length
        self.length = 0
        self.hash = hashlib.sha256()
        self._write = write

    def __call__(self, data: bytes) -> None:
        self.length += len(data)
        if self.length > self.expected_length:
            raise PatchRejectedError(
                f"patch produces more than the signed {self.expected_length} bytes"
            )
        self.hash.update(data)
        self._write(data)

    def verify(self, expected_sha256: str) -> None:
        if self.length != self.expected_length:
            raise PatchRejectedError(
                f"patched output is {self.length} bytes, signed {self.expected_length}"
            )
        observed = self.hash.hexdigest()
        if observed != expected_sha256:
            raise PatchRejectedError(
                f"patched output hashes to {observed}, signed {expected_sha256}"
            )


class _Bz2Block:
    """One bzip2 block of a bsdiff4 patch, decompressed only as far as asked."""

    def __init__(self, data: memoryview, name: str) -> None:
        self._dec = bz2.BZ2Decompressor()
        self._input: memoryview | bytes = data
        self._name = name

    def read(self, n: int, *, exact: bool = True) -> bytes:
        """Up to ``n`` bytes: exactly ``n``, or (``exact`` False) fewer only at the end."""
        parts: list[bytes] = []
        need = n
        while need > 0 and not self._dec.eof:
            data, self._input = self._input, b""
            if not data and self._dec.needs_input:
                raise PatchRejectedError(f"bsdiff4 {self._name} block is truncated")
            try:
                chunk = self._dec.decompress(data, max_length=need)
            except (OSError, EOFError, ValueError) as e:
                raise PatchRejectedError(f"bsdiff4 {self._name} block: {e}") from None
            if not chunk and not self._dec.eof and not self._dec.needs_input:
                raise PatchRejectedError(f"bsdiff4 {self._name} block makes no progress")
            parts.append(chunk)
            need -= len(chunk)
        if need and exact:
            raise PatchRejectedError(
                f"bsdiff4 {self._name} block is shorter than its control data says"
            )
        return b"".join(parts)

    def finish(self) -> None:
        """Refuse anything left: more output, or bytes after the bzip2 stream."""
        if self.read(1, exact=False):
            raise PatchRejectedError(f"bsdiff4 {self._name} block is longer than it should be")
        if self._dec.unused_data:
            raise PatchRejectedError(f"bytes after the bsdiff4 {self._name} block")


def _apply_bsdiff4(old: bytes, patch: bytes, expected_length: int, out: _Output) -> None:
    """Apply a bsdiff4 patch in steps of at most ``_STEP`` output bytes.

    The format (bsdiff 4.x): header, then bzip2 control block of (x, y, z) triples
    (add x bytes of the diff block to old, copy y bytes of the extra block, seek the
    old file by z), the bzip2 diff block and the bzip2 extra block. Each step hands
    ``bsdiff4.core.patch`` a slice of triples, preceded by a (0, 0, oldpos) seek, and
    exactly the diff and extra bytes they use; triples crossing a step boundary are
    split, which bspatch's semantics allow (add and copy are position-wise).
    """
    control_length, diff_length, _ = _bsdiff_header(patch)
    view = memoryview(patch)
    body = _BSDIFF_HEADER.size
    if body + control_length + diff_length > len(view):
        raise PatchRejectedError("bsdiff4 blocks run past the end of the patch")
    control = _Bz2Block(view[body : body + control_length], "control")
    diffs = _Bz2Block(view[body + control_length : body + control_length + diff_length], "diff")
    extra = _Bz2Block(view[body + control_length + diff_length :], "extra")

    oldpos = 0  # old-file position at the start of the current step
    step_old = 0  # old-file position after the triples of the current step
    pending: list[tuple[int, int, int]] = []
    step_new = step_x = step_y = 0

    def flush() -> None:
        nonlocal oldpos, pending, step_new, step_x, step_y
        if not pending:
            return
        seek = _CONTROL.pack(0, 0, _offtout(oldpos))
        ctrl = seek + b"".join(_CONTROL.pack(x, y, _offtout(z)) for x, y, z in pending)
        try:
            data = bsdiff4.core.patch(old, step_new, ctrl, diffs.read(step_x), extra.read(step_y))
        except ValueError as e:
            raise PatchRejectedError(f"bsdiff4 patch cannot be applied: {e}") from None
        out(bytes(data))
        oldpos = step_old
        pending = []
        step_new = step_x = step_y = 0

    def control_triples() -> Iterator[tuple[int, int, int]]:
        while raw := control.read(_CONTROL.size * _BATCH_TUPLES, exact=False):
            if len(raw) % _CONTROL.size:
                raise PatchRejectedError("bsdiff4 control block is not made of whole triples")
            for ux, uy, uz in _CONTROL.iter_unpack(raw):
                yield _offtin(ux), _offtin(uy), _offtin(uz)

    # A triple that produces nothing still costs a loop turn: bound their number,
    # so that the work is bounded by the signed length whatever the patch says.
    idle_left = 4096 + expected_length // 64
    produced = 0
    for cx, cy, z in control_triples():
        x, y = cx, cy  # what is left of this triple as it is split
        if x < 0 or y < 0 or produced + x + y > expected_length:
            raise PatchRejectedError(f"bsdiff4 control triple ({x}, {y}, {z}) is out of range")
        if x + y == 0:
            idle_left -= 1
            if idle_left < 0:
                raise PatchRejectedError("bsdiff4 control block has too many empty triples")
        produced += x + y
        while True:  # split (x, y, z) at step boundaries; each turn emits or ends
            room = _STEP - step_new
            tx = min(x, room)
            ty = min(y, room - tx) if tx == x else 0
            last = tx == x and ty == y
            tz = z if last else 0
            pending.append((tx, ty, tz))
            step_new += tx + ty
            step_x += tx
            step_y += ty
            step_old += tx + tz
            if abs(step_old) >= 1 << 62:
                raise PatchRejectedError("bsdiff4 control data seeks out of range")
            x -= tx
            y -= ty
            if step_new >= _STEP or len(pending) >= _BATCH_TUPLES:
                flush()
            if last:
                break
    if produced != expected_length:
        raise PatchRejectedError(
            f"bsdiff4 control block covers {produced} bytes, declared {expected_length}"
        )
    flush()
    control.finish()
    diffs.finish()
    extra.finish()


def _apply_zstd(old: bytes, patch: bytes, expected_length: int, out: _Output) -> None:
    """Decompress a zstd patch with ``old`` as its raw prefix, ``_STEP`` bytes at a time.

    ``window_log_max`` is what the signed sizes need, so a frame asking for a larger
    window is refused before the decoder allocates it.
    """
    dec = zstd.ZstdDecompressor(
        zstd_dict=_prefix(old),
        options={
            zstd.DecompressionParameter.window_log_max: _window_log(len(old), expected_length)
        },
    )
    data = patch
    try:
        while not dec.eof:
            if not data and dec.needs_input:
                raise PatchRejectedError("zstd patch is truncated")
            # Never more than one byte past the signed length, even in one step.
            room = out.expected_length - out.length + 1
            chunk = dec.decompress(data, max_length=min(_STEP, room))
            data = b""
            if not chunk and not dec.eof and not dec.needs_input:
                raise PatchRejectedError("zstd patch makes no progress")
            out(chunk)  # refuses output past the signed length: the loop is bounded
    except zstd.ZstdError as e:
        raise PatchRejectedError(f"zstd patch cannot be applied: {e}") from None
    if dec.unused_data:
        raise PatchRejectedError(f"{len(dec.unused_data)} bytes after the zstd frame")


def _apply(
    old: bytes,
    patch: bytes,
    fmt: DeltaFormat,
    expected_length: int,
    expected_sha256: str,
    write: Callable[[bytes], object],
) -> None:
    check_declared_size(patch[:_HEAD], fmt, expected_length)
    if len(patch) > expected_length + _PATCH_SLACK:
        raise PatchRejectedError(
            f"patch is {len(patch)} bytes, larger than the {expected_length}-byte target"
        )
    out = _Output(expected_length, write)
    try:
        if fmt is DeltaFormat.BSDIFF4:
            _apply_bsdiff4(old, patch, expected_length, out)
        else:
            _apply_zstd(old, patch, expected_length, out)
    except MemoryError:
        raise PatchRejectedError(f"{fmt} patch needs more memory than available") from None
    out.verify(expected_sha256)


def apply_patch_bytes(
    old: bytes, patch: bytes, fmt: DeltaFormat, *, expected_length: int, expected_sha256: str
) -> bytes:
    """Apply ``patch`` to ``old`` in memory and verify the result (blocking).

    Args:
        old: the verified base file.
        patch: the patch.
        fmt: the patch format.
        expected_length: the full target's signed length.
        expected_sha256: the full target's signed sha256 (hex).

    Returns:
        The verified target.

    Raises:
        PatchRejectedError: the declared size is not ``expected_length`` (checked
            before applying), the patch is malformed or longer than the target, or
            the result's length or sha256 is wrong.
    """
    result = bytearray()
    _apply(old, patch, fmt, expected_length, expected_sha256, result.extend)
    return bytes(result)


def apply_patch_file(
    old: Path,
    patch: Path,
    out: Path,
    *,
    fmt: DeltaFormat,
    expected_length: int,
    expected_sha256: str,
) -> None:
    """Apply a patch file to a verified old file and write ``out`` atomically (blocking).

    The declared size is read from the patch's first bytes and compared with the
    signed length before anything else is read or allocated. The output streams
    into a temp file beside ``out`` (hashed as it goes), which replaces ``out`` only
    once length and sha256 match; it is removed on any failure.

    Args:
        old: the verified base file.
        patch: the patch file.
        out: where the target goes.
        fmt: the patch format.
        expected_length: the full target's signed length.
        expected_sha256: the full target's signed sha256 (hex).

    Raises:
        PatchRejectedError: as :func:`apply_patch_bytes`; ``out`` is not created.
        OSError: a file cannot be read or written.
    """
    with patch.open("rb") as f:
        check_declared_size(f.read(_HEAD), fmt, expected_length)
        patch_length = os.fstat(f.fileno()).st_size
        if patch_length > expected_length + _PATCH_SLACK:
            raise PatchRejectedError(
                f"patch is {patch_length} bytes, larger than the {expected_length}-byte target"
            )
        f.seek(0)
        patch_bytes = f.read()
    old_bytes = old.read_bytes()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as w:
            _apply(old_bytes, patch_bytes, fmt, expected_length, expected_sha256, w.write)
            w.flush()
            os.fsync(w.fileno())
        tmp.chmod(0o644)
        tmp.replace(out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


async def apply_patch(
    old: Path,
    patch: Path,
    out: Path,
    *,
    fmt: DeltaFormat,
    expected_length: int,
    expected_sha256: str,
) -> None:
    """:func:`apply_patch_file` in a thread, off the event loop.

    Args:
        old: the verified base file.
        patch: the patch file.
        out: where the target goes.
        fmt: the patch format.
        expected_length: the full target's signed length.
        expected_sha256: the full target's signed sha256 (hex).

    Raises:
        PatchRejectedError: as :func:`apply_patch_file`; ``out`` is not created.
        OSError: a file cannot be read or written.
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
    """Compute, verify and place one patch; write a JSON result beside it."""
    import resource  # noqa: PLC0415 - only in the child

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
            _apply(old, patch, fmt, int(job["new_length"]), job["new_sha256"], lambda _b: None)
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
        if self._gate is None:
            self._gate = asyncio.Semaphore(self.workers)
        async with self._gate:
            if self._closed:
                return DeltaResult(DeltaOutcome.FAILED, fmt, detail="engine closed")
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
                detail = f"patch {data['length']} bytes > {self.budget.max_ratio} x {new_length}"
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

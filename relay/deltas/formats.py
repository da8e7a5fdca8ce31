"""Patch formats: making patches, reading their headers, decoding them in bounded steps.

Rules:

* Nobody signs a delta. Whoever applies one checks, *before* decoding, that the
  size the patch declares for its output is the full target's signed length (and
  that the patch is not longer than the target), and *after*, that the output's
  sha256 is the signed one (docs/PROTOCOL.md). A patch failing either check raises
  :class:`relay.errors.PatchRejectedError`.
* Decoding never trusts a size inside the patch beyond the signed length: the
  output is produced in bounded steps (zstd: ``max_length``; bsdiff4: its three
  bzip2 blocks are decompressed only as far as its control data needs, never past
  the signed length), so a decompression bomb is refused after at most the signed
  length of output, and memory stays about old file + patch + one step.
* Two formats: ``bsdiff4`` (its header carries the new size), and ``zstd`` with the
  old file as a raw prefix, the same as ``zstd --patch-from`` (``window_log`` >=
  log2 of the larger file, long-distance matching, the content size always written
  in the frame header).
* Bytes in, bytes out: no files, no threads, no processes. Everything here is
  blocking and CPU-bound; callers run it off the event loop.
"""

from __future__ import annotations

import bz2
import hashlib
import math
import struct
import sys
from collections.abc import Callable, Iterator
from typing import Any

import bsdiff4
import bsdiff4.core

from relay.core.protocol import DeltaFormat
from relay.errors import PatchRejectedError

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

PATCH_HEAD = 64  # bytes: enough for a bsdiff4 header (32) and any zstd frame header (<= 18)
PATCH_SLACK = 64 * 1024  # bytes: a patch longer than the target plus this is never worth applying
_STEP = 16 * 1024**2  # output bytes produced per step when decoding
_BATCH_TUPLES = 65536  # bsdiff4 control triples read and applied per step
_BSDIFF_HEADER = struct.Struct("<8sQQQ")
_CONTROL = struct.Struct("<QQQ")
_SIGN = 1 << 63
_ZSTD_MIN_PREFIX = 8  # bytes: zstd refuses a shorter dictionary


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


def check_patch_header(
    patch_head: bytes, patch_length: int, fmt: DeltaFormat, expected_length: int
) -> None:
    """Refuse a patch before decoding it: wrong declared output size, or longer than the target.

    Args:
        patch_head: the first bytes of the patch (:data:`PATCH_HEAD` are always enough).
        patch_length: the whole patch's length in bytes.
        fmt: the patch format.
        expected_length: the full target's signed length.

    Raises:
        PatchRejectedError: the header is malformed or declares another size than
            ``expected_length``, or the patch is longer than the target (plus
            :data:`PATCH_SLACK`).
    """
    declared = declared_output_size(patch_head, fmt)
    if declared != expected_length:
        raise PatchRejectedError(
            f"patch declares {declared} bytes of output, the signed length is {expected_length}"
        )
    if patch_length > expected_length + PATCH_SLACK:
        raise PatchRejectedError(
            f"patch is {patch_length} bytes, larger than the {expected_length}-byte target"
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


def decode_patch(
    old: bytes,
    patch: bytes,
    fmt: DeltaFormat,
    *,
    expected_length: int,
    expected_sha256: str,
    write: Callable[[bytes], object],
) -> None:
    """Decode ``patch`` against ``old``, handing the output to ``write`` in bounded steps.

    The header is checked first (:func:`check_patch_header`); every step is counted
    against ``expected_length`` and hashed; length and sha256 are checked at the end.
    ``write`` may have received output by the time a check fails: the caller drops it.

    Args:
        old: the verified base file.
        patch: the patch.
        fmt: the patch format.
        expected_length: the full target's signed length.
        expected_sha256: the full target's signed sha256 (hex).
        write: receives the output, at most one step (16 MiB) at a time.

    Raises:
        PatchRejectedError: the declared size is not ``expected_length`` (checked
            before decoding), the patch is malformed or longer than the target, or
            the result's length or sha256 is wrong.
    """
    check_patch_header(patch[:PATCH_HEAD], len(patch), fmt, expected_length)
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

    :func:`decode_patch` collecting its output: the same arguments, less ``write``.

    Returns:
        The verified target.

    Raises:
        PatchRejectedError: as :func:`decode_patch`.
    """
    result = bytearray()
    decode_patch(
        old,
        patch,
        fmt,
        expected_length=expected_length,
        expected_sha256=expected_sha256,
        write=result.extend,
    )
    return bytes(result)

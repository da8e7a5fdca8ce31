"""Applying a patch to a file safely: what an agent (or a child relay) does with a delta.

Rules:

* The patch's first bytes are read and its declared output size compared with
  the full target's signed length *before* anything else is read or allocated;
  a patch longer than the target is refused too (:func:`relay.deltas.formats.check_patch_header`).
* The output streams into a temp file beside the destination, hashed as it goes;
  the temp replaces the destination only once length and sha256 match the signed
  ones, and is removed on any failure: a refused patch leaves no file behind.
* No processes and no network here: this module is what the agent imports. It
  blocks (reading, decoding, hashing, fsync): on an event loop, call it through
  ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from relay.core.protocol import DeltaFormat
from relay.deltas.formats import PATCH_HEAD, check_patch_header, decode_patch


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

    Args:
        old: the verified base file.
        patch: the patch file.
        out: where the target goes.
        fmt: the patch format.
        expected_length: the full target's signed length.
        expected_sha256: the full target's signed sha256 (hex).

    Raises:
        PatchRejectedError: as :func:`relay.deltas.formats.decode_patch`; ``out`` is
            not created.
        OSError: a file cannot be read or written.
    """
    with patch.open("rb") as f:
        check_patch_header(f.read(PATCH_HEAD), os.fstat(f.fileno()).st_size, fmt, expected_length)
        f.seek(0)
        patch_bytes = f.read()
    old_bytes = old.read_bytes()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as w:
            decode_patch(
                old_bytes,
                patch_bytes,
                fmt,
                expected_length=expected_length,
                expected_sha256=expected_sha256,
                write=w.write,
            )
            w.flush()
            os.fsync(w.fileno())
        tmp.chmod(0o644)
        tmp.replace(out)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise

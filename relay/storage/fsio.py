"""File I/O shared by every part: durable writes and streamed hashing.

Writes go through a temp file in the same directory, fsync and ``os.replace``.
Blocking by nature: call these from a thread (``asyncio.to_thread``) when on the loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import tempfile
from pathlib import Path

from relay.errors import StartupError

HASH_BLOCK = 1 << 20
"""Bytes read per step by :func:`hash_file` (memory stays bounded whatever the file size)."""


def fsync_dir(path: Path) -> None:
    """Fsync a directory, so a rename inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, whole.

    The temp file (``.<name>.<pid>.<random>.tmp``: unique per writer, so two
    writers never share one) is removed if anything fails.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def hash_file(path: Path) -> tuple[str, int]:
    """The sha256 (hex) and length of a file, read in blocks of :data:`HASH_BLOCK`.

    Blocking: from asyncio, call it in a thread.

    Args:
        path: the file.

    Returns:
        ``(sha256 hex digest, length in bytes)``.

    Raises:
        OSError: the file cannot be opened or read.
    """
    digest = hashlib.sha256()
    length = 0
    with path.open("rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
            length += len(block)
    return digest.hexdigest(), length


def ensure_directory(path: Path, key: str) -> None:
    """Create ``path`` if needed, and check that this process can write in it.

    Writability is probed by creating and removing a file, so a read-only mount, an
    ACL or a missing capability is caught as surely as the mode bits.

    Args:
        path: the directory.
        key: what the operator set it with (``relay.data_dir``, ``--install-dir``),
            for the message.

    Raises:
        StartupError: ``path`` or a parent of it is a file, or the directory cannot
            be created or written.
    """
    subject = f"{key} {path}"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StartupError(
            subject, "is a file, not a directory", "remove the file or choose another directory"
        ) from None
    except NotADirectoryError:
        raise StartupError(
            subject, "a parent of it is a file", "choose a path whose parents are directories"
        ) from None
    except OSError as e:
        raise StartupError(
            subject,
            f"cannot be created: {e.strerror}",
            "create it and give it to the user the program runs as",
        ) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        Path(probe).unlink()
    except OSError as e:
        raise StartupError(
            subject,
            f"not writable by this user (uid {os.geteuid()}): {e.strerror}",
            "give it to the user the program runs as (chown -R) or choose another directory",
        ) from None


def copy_hashed(source: Path, dest: Path) -> tuple[str, int]:
    """Copy ``source`` to ``dest`` (created or truncated), hashing the bytes as they pass.

    ``dest`` is flushed and fsynced; the caller renames it into place once the digest is
    what it expects. Blocking: from asyncio, call it in a thread.

    Args:
        source: the file to read.
        dest: the file to write.

    Returns:
        ``(sha256 hex digest, length in bytes)`` of what was written.

    Raises:
        OSError: reading or writing failed.
    """
    digest = hashlib.sha256()
    length = 0
    with source.open("rb") as src, dest.open("wb") as out:
        while block := src.read(HASH_BLOCK):
            digest.update(block)
            length += len(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), length

"""Secrets the relay keeps in its data directory (owner-only files).

Blocking (file I/O): call from a thread when on the event loop.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from relay.storage.fsio import fsync_dir


def load_or_create_secret(path: Path, size: int) -> bytes:
    """The secret in ``path``; made (``size`` random bytes, mode 0600) when there is none.

    Creation is exclusive: two processes starting at once end up with the same
    secret. A file of the wrong size is replaced (it cannot have signed anything
    this relay accepts).

    Raises:
        OSError: the file cannot be read or created.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        data = path.read_bytes()
        if len(data) == size:
            return data
        path.unlink()
    data = secrets.token_bytes(size)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_or_create_secret(path, size)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)
    return data

"""Open read-only files of hot blobs and patches (like nginx's ``open_file_cache``).

Rules:

* A hot file costs no thread-pool hop at all; a cold one costs one (the ``open``).
* A file is closed only when it has left the cache and no response uses it;
  closing happens in a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from pathlib import Path
from typing import IO


class OpenFile:
    """An open file and how many responses use it."""

    __slots__ = ("evicted", "file", "users")

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.users = 0
        self.evicted = False


class OpenFileCache:
    """Open read-only files of hot blobs, keyed by digest, least recently used out.

    A file is closed only when it has left the cache and no response uses it.
    """

    def __init__(self, size: int = 256) -> None:
        self._size = size
        self._files: OrderedDict[str, OpenFile] = OrderedDict()

    async def acquire(self, sha256: str, path: Path) -> OpenFile:
        """Return the open file of ``sha256`` (opening it in a thread if needed).

        Raises:
            OSError: the file cannot be opened.
        """
        entry = self._files.get(sha256)
        if entry is None:
            file = await asyncio.get_running_loop().run_in_executor(None, path.open, "rb")
            entry = self._files.get(sha256)  # another request may have opened it meanwhile
            if entry is None:
                entry = OpenFile(file)
                self._files[sha256] = entry
                self._trim()
            else:
                _close_later(file)
        self._files.move_to_end(sha256)
        entry.users += 1
        return entry

    def release(self, entry: OpenFile) -> None:
        """Stop using ``entry``."""
        entry.users -= 1
        if entry.evicted and entry.users == 0:
            _close_later(entry.file)

    def forget(self, sha256: str) -> None:
        """Drop ``sha256`` (evicted or quarantined blob)."""
        entry = self._files.pop(sha256, None)
        if entry is not None:
            entry.evicted = True
            if entry.users == 0:
                _close_later(entry.file)

    def _trim(self) -> None:
        while len(self._files) > self._size:
            _, entry = self._files.popitem(last=False)
            entry.evicted = True
            if entry.users == 0:
                _close_later(entry.file)

    def close(self) -> None:
        """Close every file (at shutdown)."""
        for entry in self._files.values():
            with contextlib.suppress(OSError):
                entry.file.close()
        self._files.clear()


def _close_later(file: IO[bytes]) -> None:
    with contextlib.suppress(RuntimeError):
        # Fire and forget: closing a read-only regular file needs no result.
        _ = asyncio.get_running_loop().run_in_executor(None, file.close)

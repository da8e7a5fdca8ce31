"""Hints for typos: the known name closest to a mistyped one.

Pure: no I/O.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(value: str, known: Iterable[str]) -> str | None:
    """Return the known name closest to ``value``, or ``None`` when none is close."""
    found = difflib.get_close_matches(value, list(known), n=1)
    return found[0] if found else None


def did_you_mean(value: str, known: Iterable[str]) -> str:
    """Return ``"; did you mean X?"`` for the known name closest to ``value``, or ``""``."""
    found = closest(value, known)
    return f"; did you mean {found}?" if found else ""


__all__ = ["closest", "did_you_mean"]

"""SemVer 2.0.0 parsing and precedence (https://semver.org/#spec-item-11).

Build metadata is kept but ignored for precedence, as the spec says.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

# The regular expression suggested by semver.org, anchored.
_SEMVER = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$",
    re.ASCII,  # digits are 0-9 (without it, \d takes any script's digits)
)


@functools.total_ordering
@dataclass(frozen=True, slots=True)
class Version:
    """A SemVer 2.0.0 version; ordering is SemVer precedence."""

    major: int
    minor: int
    patch: int
    prerelease: tuple[str, ...] = ()
    build: str = ""

    @classmethod
    def parse(cls, text: str) -> Version:
        """Parse ``text``.

        Raises:
            ValueError: ``text`` is not a SemVer 2.0.0 version.
        """
        match = _SEMVER.fullmatch(text)  # not "$", which takes a trailing newline
        if match is None:
            raise ValueError(f"{text!r} is not a SemVer 2.0 version (e.g. 1.4.2 or 2.0.0-rc.1)")
        major, minor, patch, pre, build = match.groups()
        return cls(
            int(major), int(minor), int(patch), tuple(pre.split(".")) if pre else (), build or ""
        )

    def _key(self) -> tuple[int, int, int, int, tuple[tuple[int, int, str], ...]]:
        # A version without pre-release ranks above any pre-release of it;
        # numeric identifiers rank below alphanumeric ones (spec item 11.4).
        pre = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in self.prerelease)
        return (self.major, self.minor, self.patch, 0 if self.prerelease else 1, pre)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() < other._key()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __str__(self) -> str:
        text = f"{self.major}.{self.minor}.{self.patch}"
        if self.prerelease:
            text += "-" + ".".join(self.prerelease)
        if self.build:
            text += "+" + self.build
        return text


def is_valid(text: str) -> bool:
    """Return whether ``text`` is a SemVer 2.0.0 version."""
    return _SEMVER.match(text) is not None

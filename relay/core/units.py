"""Parsing of sizes, rates and durations as docs/PROTOCOL.md writes them.

Sizes: an integer number of bytes, or a number with ``KB``/``MB``/``GB`` (powers of
1000) or ``KiB``/``MiB``/``GiB`` (powers of 1024); ``B`` is accepted. Rates are
sizes per second (an optional ``/s`` suffix is accepted). Durations: seconds as a
number, or a number with ``s``/``m``/``h``/``d``.

These functions raise :class:`ValueError` with a message; the configuration
loader turns it into a :class:`relay.errors.ConfigError` naming key and source.
"""

from __future__ import annotations

import re

_SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KIB": 1024,
    "MIB": 1024**2,
    "GIB": 1024**3,
    "TIB": 1024**4,
}
_SIZE_NAMES = "B, KB, MB, GB, KiB, MiB or GiB"
_DURATION_UNITS = {"": 1.0, "S": 1.0, "M": 60.0, "H": 3600.0, "D": 86400.0}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_size(value: object) -> int:
    """Return a size in bytes.

    Args:
        value: an ``int`` (bytes) or a string such as ``"10MB"`` or ``"1.5 GiB"``.

    Returns:
        The number of bytes, rounded down.

    Raises:
        ValueError: the value is negative, not a number, or has an unknown unit.
    """
    return int(_quantity(value, "size", _SIZE_UNITS, "1048576, '10MB' or '1GiB'", _SIZE_NAMES))


def parse_rate(value: object) -> int:
    """Return a rate in bytes per second (a size, with an optional ``/s``).

    Raises:
        ValueError: as :func:`parse_size`.
    """
    if isinstance(value, str) and value.strip().lower().endswith("/s"):
        value = value.strip()[:-2]
    return parse_size(value)


def parse_duration(value: object) -> float:
    """Return a duration in seconds.

    Args:
        value: a number of seconds, or a string such as ``"30s"``, ``"5m"``, ``"1d"``.

    Raises:
        ValueError: the value is negative, not a number, or has an unknown unit.
    """
    return _quantity(
        value, "duration", _DURATION_UNITS, "30, '30s', '5m', '2h' or '1d'", "s, m, h or d"
    )


def _quantity(
    value: object, what: str, units: dict[str, float] | dict[str, int], example: str, names: str
) -> float:
    """A number with an optional unit, as a multiple of the base unit."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a {what} such as {example}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a {what} cannot be negative")
        return value
    match = _NUMBER_UNIT.match(value)
    if match is None:
        raise ValueError(f"expected a {what} such as {example}")
    number, unit = match.groups()
    factor = units.get(unit.upper())
    if factor is None:
        raise ValueError(f"unknown {what} unit {unit!r} (use {names})")
    return float(number) * factor

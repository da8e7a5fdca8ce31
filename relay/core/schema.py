"""Settings declared once: each dataclass field carries its parser and its documentation.

A settings class is a frozen dataclass whose fields are made with :func:`setting`. From
that one declaration come:

* :func:`parser_of` / :func:`keys_of`: how the configuration loader reads a key, from a
  TOML or JSON value (``text=False``) or from the text form of an environment variable
  or a command-line flag (``text=True``);
* :func:`from_dict` and :func:`to_dict`: the JSON form (the admin API, replicas), with
  the same parsers, so a value refused in the file is refused over the API too;
* :func:`doc_of`: the documentation of each key (``config/relay.example.toml`` gives
  each key that text as its comment, and a test holds them together).

Parsers take ``(value, text)``. They return the typed value, or raise
:class:`InvalidValue` (any :class:`ValueError` will do) with the reason; ``at`` names
the part of the value at fault (a key of a table). Text forms: lists are
comma-separated, booleans are ``true``/``false``/``1``/``0``/``yes``/``no``/``on``/``off``
(any case), integers may be padded with spaces.

Pure: no I/O, nothing read at import time.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from enum import Enum
from pathlib import PurePath
from types import MappingProxyType
from typing import Any, TypeVar, cast

Parser = Callable[[Any, bool], Any]
T = TypeVar("T")
S = TypeVar("S")

_SPEC = "relay.setting"
_INT = re.compile(r"\s*-?[0-9]+\s*")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class InvalidValue(ValueError):  # noqa: N818 - reads as what it is: a value refused
    """A value a parser refuses.

    Attributes:
        reason: why, in a few words.
        at: the part of the value at fault (a table key); ``""`` for the whole value.
    """

    def __init__(self, reason: str, at: str = "") -> None:
        super().__init__(f"{at}: {reason}" if at else reason)
        self.reason = reason
        self.at = at


@dataclass(frozen=True, slots=True)
class Spec:
    """What a settings field declares besides its type and default."""

    parse: Parser
    doc: str
    merge: bool = False  # a table: from_dict keeps the base's entries it does not name


def setting(parse: Parser, doc: str, *, default: T, merge: bool = False, hidden: bool = False) -> T:
    """Declare a settings field: its default, its parser and its documentation.

    Args:
        parse: reads the value, from ``(value, text)``.
        doc: what the key means, with its unit (the example file's comment).
        default: the built-in default; a mapping is stored read-only.
        merge: a table whose JSON form may name only some keys (the others are kept).
        hidden: a secret, left out of ``repr``.

    Returns:
        The dataclass field (typed as the default, as :func:`dataclasses.field` is).
    """
    metadata = {_SPEC: Spec(parse, doc, merge)}
    if isinstance(default, Mapping):
        frozen = MappingProxyType(dict(default))
        made = dataclasses.field(default_factory=lambda: frozen, metadata=metadata)
        return cast("T", made)
    return dataclasses.field(default=default, metadata=metadata, repr=not hidden)


def _specs(cls: type) -> dict[str, Spec]:
    return {f.name: f.metadata[_SPEC] for f in dataclasses.fields(cls) if _SPEC in f.metadata}


def keys_of(cls: type) -> tuple[str, ...]:
    """Return the keys ``cls`` declares with :func:`setting`, in declaration order."""
    return tuple(_specs(cls))


def parser_of(cls: type, key: str) -> Parser | None:
    """Return the parser of ``key`` in ``cls``; ``None`` for an unknown key."""
    spec = _specs(cls).get(key)
    return None if spec is None else spec.parse


def doc_of(cls: type, key: str) -> str:
    """Return the documentation of ``key`` in ``cls``.

    Raises:
        KeyError: ``cls`` declares no such key.
    """
    return _specs(cls)[key].doc


def from_dict(data: Mapping[str, Any], base: S) -> S:
    """Build settings from (part of) their JSON form, on top of ``base``.

    Args:
        data: the decoded JSON object; absent keys keep ``base``'s values.
        base: the settings to change; only the keys its class declares are accepted.

    Returns:
        A new settings object of ``base``'s class.

    Raises:
        ValueError: an unknown or malformed key; the message starts with the key (and
            the part of its value at fault: ``install_undefined.firmware: ...``).
    """
    specs = _specs(type(base))
    changes: dict[str, Any] = {}
    for key, value in data.items():
        spec = specs.get(key)
        if spec is None:
            raise ValueError(f"{key}: unknown setting")
        try:
            parsed = spec.parse(value, False)  # noqa: FBT003 - text: no
        except InvalidValue as e:
            where = f"{key}.{e.at}" if e.at else key
            raise ValueError(f"{where}: {e.reason}") from None
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        if spec.merge:
            parsed = {**getattr(base, key), **parsed}
        changes[key] = parsed
    return dataclasses.replace(base, **changes)  # type: ignore[type-var]


def to_dict(settings: object) -> dict[str, Any]:
    """Return the JSON form of a settings object: one entry per declared key.

    Enums become their values, tuples lists, sets sorted lists, tables objects with
    sorted keys.
    """
    return {key: _plain(getattr(settings, key)) for key in _specs(type(settings))}


def project(cls: type[S], settings: S) -> S:
    """Return the ``cls`` part of ``settings`` (an instance of a subclass of ``cls``)."""
    return cls(**{key: getattr(settings, key) for key in _specs(cls)})


def _plain(value: object) -> object:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, PurePath):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # A table of a list (a schedule entry): its set fields, as a file would give them.
        fields = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
        return {name: _plain(v) for name, v in fields if v is not None}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {
            str(_plain(k)): _plain(v) for k, v in sorted(value.items(), key=lambda i: str(i[0]))
        }
    if isinstance(value, AbstractSet):
        return sorted((_plain(v) for v in value), key=str)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    raise TypeError(f"no JSON form for {type(value).__name__}")


# -- parsers ---------------------------------------------------------------------------


def boolean(value: object, text: bool) -> bool:
    """Parse a boolean; the text form also takes 1/0, yes/no, on/off.

    Raises:
        InvalidValue: anything else.
    """
    if isinstance(value, bool):
        return value
    if text and isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise InvalidValue(f"expected one of {', '.join(_TRUE + _FALSE)}")
    raise InvalidValue("expected true or false")


def integer(minimum: int = 0, maximum: int | None = None) -> Parser:
    """Return a parser of integers from ``minimum`` to ``maximum`` (no bound: ``None``)."""

    def parse(value: object, text: bool) -> int:
        if text and isinstance(value, str) and _INT.fullmatch(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidValue("expected an integer")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise InvalidValue(f"must be {bound}")
        return value

    return parse


def string(value: object, _text: bool) -> str:
    """Parse any string, the empty one included.

    Raises:
        InvalidValue: not a string.
    """
    if not isinstance(value, str):
        raise InvalidValue("expected a string")
    return value


def name(value: object, _text: bool) -> str:
    """Parse a non-empty string (a group name, say).

    Raises:
        InvalidValue: not a string, or empty.
    """
    if not isinstance(value, str) or not value:
        raise InvalidValue("expected a non-empty string")
    return value


def choice(*choices: str) -> Parser:
    """Return a parser that takes one of ``choices`` (the text form may be padded)."""

    def parse(value: object, text: bool) -> str:
        if text and isinstance(value, str):
            value = value.strip()
        if not isinstance(value, str) or value not in choices:
            raise InvalidValue(f"expected one of {', '.join(choices)}")
        return value

    return parse


def list_of(item: Parser, *, unique: bool = False, non_empty: bool = False) -> Parser:
    """Return a parser of lists (comma-separated in the text form) of ``item``, as a tuple."""

    def parse(value: object, text: bool) -> tuple[Any, ...]:
        if text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            form = "a comma-separated list" if text else "a list such as [...]"
            raise InvalidValue(f"expected {form}")
        out: list[Any] = []
        for i, v in enumerate(value):
            try:
                parsed = item(v, text)
            except ValueError as e:
                raise InvalidValue(f"item {i} ({v!r}): {e}") from None
            if unique and parsed in out:
                raise InvalidValue(f"item {i} ({v!r}) is repeated")
            out.append(parsed)
        if non_empty and not out:
            raise InvalidValue("needs at least one item")
        return tuple(out)

    return parse


__all__ = [
    "InvalidValue",
    "Parser",
    "Spec",
    "boolean",
    "choice",
    "doc_of",
    "from_dict",
    "integer",
    "keys_of",
    "list_of",
    "name",
    "parser_of",
    "project",
    "setting",
    "string",
    "to_dict",
]

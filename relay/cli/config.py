"""``relay config check|show``: the configuration ``relay serve`` would run with.

Both load it as ``relay serve`` does: the ``--config`` file, then ``RELAY_<SECTION>__<KEY>``
variables, then the flags ``relay serve`` takes. ``check`` prints ``ok`` or exits with the
one-line configuration error; ``show`` prints every key as TOML (a file ``relay serve
--config`` reads back) with where its value came from as a trailing comment. Secrets
(fields declared ``hidden``) are never printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

from relay.cli.exitcodes import ExitCode
from relay.config import COMMAND_LINE, Config, load_config
from relay.core.schema import keys_of

HIDDEN = "<hidden>"
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_COMMENT_COLUMN = 33  # where the source comment starts, as in config/relay.example.toml


def serve_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The dotted keys that ``relay serve``'s flags set (flags not given are left out)."""
    pairs = {
        "upstream.urls": list(args.upstream) if args.upstream else None,
        "upstream.trusted_root": str(args.trusted_root) if args.trusted_root else None,
        "relay.data_dir": str(args.data_dir) if args.data_dir else None,
        "relay.listen": args.listen,
        "relay.log_format": args.log_format,
        "admin.token_file": str(args.admin_token_file) if args.admin_token_file else None,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def source_label(config: Config, key: str) -> str:
    """Say where ``key`` got its value.

    Returns:
        ``default``, ``file PATH``, the variable's name, or ``command line``.
    """
    source = config.sources.get(key)
    if source is None:
        return "default"
    if source == COMMAND_LINE or source.startswith("RELAY_"):
        return source
    return f"file {source}"


def toml_value(value: object) -> str:
    """Return ``value`` written as a TOML value (tables inline).

    Raises:
        TypeError: a value with no TOML form (none occurs in a :class:`Config`).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return toml_value(value.value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Path):  # Path("") reads back as "."; both mean "not set"
        return toml_value("" if str(value) == "." else str(value))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a TOML basic string
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # A table; a field left at None (a rate a schedule window does not set) is left out.
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return toml_value({k: v for k, v in fields.items() if v is not None})
    if isinstance(value, Mapping):
        pairs = sorted(
            (str(k.value if isinstance(k, enum.Enum) else k), v) for k, v in value.items()
        )
        inner = ", ".join(f"{_key(k)} = {toml_value(v)}" for k, v in pairs)
        return f"{{ {inner} }}" if inner else "{}"
    if isinstance(value, tuple | list | frozenset | set):
        items = sorted(value, key=str) if isinstance(value, frozenset | set) else value
        return "[" + ", ".join(toml_value(v) for v in items) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


def _key(name: str) -> str:
    return name if _BARE_KEY.fullmatch(name) else json.dumps(name)


def _hidden_keys(section: object) -> set[str]:
    # Secrets are the fields declared hidden (left out of repr).
    return {f.name for f in dataclasses.fields(section) if not f.repr}  # type: ignore[arg-type]


def render(config: Config) -> str:
    """Return ``config`` as TOML, each key with its source as a trailing comment."""
    lines: list[str] = []
    for field in dataclasses.fields(config):
        section = getattr(config, field.name)
        if not dataclasses.is_dataclass(section):
            continue
        hidden = _hidden_keys(section)
        lines += [*([""] if lines else []), f"[{field.name}]"]
        for key in keys_of(type(section)):
            value = getattr(section, key)
            shown = toml_value(HIDDEN if key in hidden and value else value)
            text = f"{key} = {shown}"
            pad = " " * max(1, _COMMENT_COLUMN - len(text))
            lines.append(f"{text}{pad}# {source_label(config, f'{field.name}.{key}')}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``relay config check`` or ``relay config show``.

    Raises:
        ConfigError: the configuration does not load, or ``admin.token_file`` cannot
            be read; the message names the key, the value and its source.
    """
    config = load_config(args.config, os.environ, serve_overrides(args))
    if args.config_command == "check":
        config.admin_token()  # reads admin.token_file, as a start or a reload would
        print("ok")
    else:
        print(render(config))
    return ExitCode.OK

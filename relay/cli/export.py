"""``relay export``: a relay's verified data as a static tree for any web server."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from relay.cache.export import export_static
from relay.cli.exitcodes import ExitCode
from relay.config import Config, load_config
from relay.errors import ExportError

_MISSING_SHOWN = 5


def _trusted_root(config: Config) -> bytes | None:
    path = config.upstream.trusted_root
    if path == Path():  # not set
        return None
    try:
        return path.read_bytes()
    except OSError as e:
        msg = f"cannot read the trusted root {path}: {e.strerror}"
        raise ExportError(msg) from e


def run(args: argparse.Namespace) -> int:
    """Export once and print what was done.

    Raises:
        ConfigError: a key of the file, a variable or a flag is invalid.
        ExportError: the data does not verify, a blob is damaged or the output cannot be
            written (the output is left as it was).
    """
    overrides: dict[str, object] = {}
    if args.data_dir:
        overrides["relay.data_dir"] = str(args.data_dir)
    if args.trusted_root:
        overrides["upstream.trusted_root"] = str(args.trusted_root)
    config = load_config(args.config, os.environ, overrides)
    report = export_static(
        config.relay.metadata_dir,
        config.relay.blobs_dir,
        args.out,
        trusted_root=_trusted_root(config),
        check_kept=args.check_kept,
        link=not args.copy,
    )
    print(
        f"exported {config.relay.data_dir} to {args.out}: timestamp version "
        f"{report.timestamp_version}, expires {report.expires:%Y-%m-%dT%H:%M:%SZ}; targets: "
        f"{report.linked} linked, {report.copied} copied, {report.kept} kept; metadata: "
        f"{report.metadata_written} written, {report.metadata_kept} kept"
    )
    if report.missing:
        shown = ", ".join(report.missing[:_MISSING_SHOWN])
        more = len(report.missing) - _MISSING_SHOWN
        print(
            f"relay export: {len(report.missing)} targets not in the store, not exported: "
            f"{shown}{f' and {more} more' if more > 0 else ''}",
            file=sys.stderr,
        )
    return ExitCode.OK

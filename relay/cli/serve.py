"""``relay serve``: run a relay from the configuration and the command line."""

from __future__ import annotations

import argparse
import asyncio
import os

from relay.cli.exitcodes import ExitCode
from relay.config import Config, load_config
from relay.server.run import serve


def _overrides(args: argparse.Namespace) -> dict[str, object]:
    pairs = {
        "upstream.urls": list(args.upstream) if args.upstream else None,
        "upstream.trusted_root": str(args.trusted_root) if args.trusted_root else None,
        "relay.data_dir": str(args.data_dir) if args.data_dir else None,
        "relay.listen": args.listen,
        "relay.log_format": args.log_format,
    }
    return {k: v for k, v in pairs.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT (exit 0); SIGHUP re-reads the configuration.

    Raises:
        ConfigError: a key of the file, a variable or a flag is invalid.
        StartupError: the host or a file is not as configured (port in use, data
            directory locked or not writable, trusted root not a TUF root).
    """
    overrides = _overrides(args)
    config = load_config(args.config, os.environ, overrides)

    def reload() -> Config:  # on SIGHUP: the same file, variables and flags
        return load_config(args.config, os.environ, overrides)

    asyncio.run(serve(config, reload=reload, verbose=args.verbose))
    return ExitCode.OK

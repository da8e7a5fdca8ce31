"""``relay serve``: run a relay from the configuration and the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

from relay.cli.exitcodes import ExitCode
from relay.config import load_config
from relay.server.run import serve, setup_logging


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
    """Serve until interrupted.

    Raises:
        ConfigError: a key of the file, a variable or a flag is invalid.
    """
    config = load_config(args.config, os.environ, _overrides(args))
    setup_logging(config.relay.log_format, logging.INFO - 10 * min(args.verbose, 1))
    asyncio.run(serve(config))
    return ExitCode.OK

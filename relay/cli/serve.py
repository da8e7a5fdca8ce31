"""``relay serve``: run a relay from the configuration and the command line."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from relay.cli.admin import OLD_TOKEN_VARIABLE, TOKEN_VARIABLE
from relay.cli.config import serve_overrides
from relay.cli.exitcodes import ExitCode
from relay.config import Config, load_config
from relay.server.run import loop_factory, serve


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT (exit 0); SIGHUP re-reads the configuration.

    Raises:
        ConfigError: a key of the file, a variable or a flag is invalid.
        StartupError: the host or a file is not as configured (port in use, data
            directory locked or not writable, trusted root not a TUF root).
    """
    if OLD_TOKEN_VARIABLE in os.environ and TOKEN_VARIABLE not in os.environ:
        # The client's old name: the relay does not read it; say so, or the operator
        # wonders why the admin API is off.
        print(
            f"relay serve: warning: {OLD_TOKEN_VARIABLE} is not read by relay serve: "
            f"set {TOKEN_VARIABLE} or admin.token_file (--admin-token-file)",
            file=sys.stderr,
        )
    overrides = serve_overrides(args)
    config = load_config(args.config, os.environ, overrides)

    def reload() -> Config:  # on SIGHUP: the same file, variables and flags
        return load_config(args.config, os.environ, overrides)

    with asyncio.Runner(loop_factory=loop_factory(config.relay.event_loop)) as runner:
        runner.run(serve(config, reload=reload, verbose=args.verbose))
    return ExitCode.OK

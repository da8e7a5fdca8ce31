"""Command line: ``relay <command>``.

One ``_<cmd>_parser(subparsers)`` per command, a separate :func:`make_parser`,
and :func:`main` mapping domain errors to exit codes in one place.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from relay import __version__
from relay.errors import ConfigError, PublishError, RelayError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 3
EXIT_INTERRUPTED = 130

_EPILOG = """\
exit codes:
  0    success
  1    the command failed (the message says why; nothing was changed)
  2    usage error (bad arguments)
  3    configuration error (names the key and the file or variable)
  130  interrupted
"""


def make_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every working subcommand."""
    parser = argparse.ArgumentParser(
        prog="relay",
        description="A verifying update relay for fleets of endpoint agents.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    del subparsers  # commands are added by their _<cmd>_parser functions
    return parser


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * min(verbosity, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    parser = make_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        result: int = args.func(args)
    except ConfigError as e:
        print(f"relay: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except PublishError as e:
        print(f"relay publish: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except RelayError as e:
        print(f"relay: error: {e}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return result


if __name__ == "__main__":
    sys.exit(main())

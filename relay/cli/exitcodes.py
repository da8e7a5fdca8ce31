"""Exit codes of ``relay``, shared by :mod:`relay.cli.main` and the command modules."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """What ``relay`` returns to the shell (listed in ``relay --help``)."""

    OK = 0
    FAILURE = 1  # the command failed; the message says why
    USAGE = 2  # bad arguments (argparse's own code)
    STARTUP = 2  # the host or a file is not as configured: port in use, data dir locked...
    CONFIG = 3  # a configuration error naming the key and its source
    INTERRUPTED = 130

"""The command line: ``relay publish|serve|agent|admin|demo``."""

from relay.cli.main import main

__all__ = ["main"]

"""Transfers to clients: admission (slots per relay and per agent), open files, pacing."""

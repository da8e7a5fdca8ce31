"""Shared fixtures: real servers on 127.0.0.1, no mocked sessions."""

"""Binary deltas: patch formats, safe application, the diff engine, the service."""

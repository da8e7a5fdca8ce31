"""The vendor side: keys, signing, the static TUF repository."""

from relay.publisher.repository import Repository, format_table

__all__ = ["Repository", "format_table"]

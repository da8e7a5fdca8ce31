"""relay: a verifying update relay for fleets of endpoint agents.

The public API is re-exported here once; everything else is internal.
"""

from relay.errors import (
    ConfigError,
    DeltaError,
    HashMismatchError,
    LengthMismatchError,
    MetadataRejectedError,
    PatchRejectedError,
    PublishError,
    RelayError,
    TransportError,
    UpstreamContentError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DeltaError",
    "HashMismatchError",
    "LengthMismatchError",
    "MetadataRejectedError",
    "PatchRejectedError",
    "PublishError",
    "RelayError",
    "TransportError",
    "UpstreamContentError",
    "__version__",
]

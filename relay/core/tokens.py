"""Agent tokens: proof that a request comes from the agent it names, checked without a lookup.

A relay answers each check-in with a token for the agent id of that check-in; the
agent sends it back as ``Relay-Agent-Token`` beside ``Relay-Agent-Id`` on every
request. The token is ``1.<expiry>.<mac>``: the expiry in Unix seconds and the
HMAC-SHA256 of the agent id and the expiry, keyed by the relay's secret
(base64url, no padding). Verifying it is one HMAC: no state, no database.

Rules:

* A token is valid only for the id it was issued to, until its expiry, under the
  secret that made it; anything else (malformed, expired, another id, another
  secret, or another spelling of a valid one) is simply not valid, and the request
  counts as its client address.
* Values in, values out: no I/O (the secret is read by :mod:`relay.storage.secret`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

TOKEN_VERSION = "1"  # noqa: S105 - a format version
TOKEN_LIFETIME = 7 * 24 * 3600.0
"""Seconds a token stays valid (agents get a fresh one at every check-in)."""
SECRET_BYTES = 32
_MAX_TOKEN = 128


def _mac(secret: bytes, agent_id: str, expires: int) -> bytes:
    message = f"{TOKEN_VERSION}\n{agent_id}\n{expires}".encode()
    return hmac.new(secret, message, hashlib.sha256).digest()


def issue_token(secret: bytes, agent_id: str, now: float, lifetime: float = TOKEN_LIFETIME) -> str:
    """A token for ``agent_id`` valid until ``now + lifetime``.

    Raises:
        ValueError: the secret is shorter than :data:`SECRET_BYTES`.
    """
    if len(secret) < SECRET_BYTES:
        raise ValueError(f"the token secret must be at least {SECRET_BYTES} bytes")
    expires = int(now + lifetime)
    mac = base64.urlsafe_b64encode(_mac(secret, agent_id, expires)).rstrip(b"=").decode()
    return f"{TOKEN_VERSION}.{expires}.{mac}"


def verify_token(secret: bytes, agent_id: str, token: str, now: float) -> bool:
    """Whether ``token`` was issued by ``secret`` to ``agent_id`` and has not expired."""
    if len(token) > _MAX_TOKEN:
        return False
    version, _, rest = token.partition(".")
    expires_text, _, mac_text = rest.partition(".")
    # Only the form issue_token writes: ASCII digits without a leading zero, the MAC in
    # unpadded URL-safe base64 (a spelling that decodes to the same bytes is refused).
    if (
        version != TOKEN_VERSION
        or not expires_text.isascii()
        or not expires_text.isdigit()
        or expires_text.startswith("0")
        or not mac_text.isascii()
    ):
        return False
    expires = int(expires_text)
    if expires <= now:
        return False
    expected = base64.urlsafe_b64encode(_mac(secret, agent_id, expires)).rstrip(b"=")
    return hmac.compare_digest(mac_text.encode(), expected)

"""Agent tokens: issued for one id, checked without a lookup, refused when forged."""

from __future__ import annotations

import os
import stat

import pytest

from relay.core.tokens import SECRET_BYTES, TOKEN_LIFETIME, issue_token, verify_token
from relay.storage.secret import load_or_create_secret

SECRET = bytes(range(SECRET_BYTES))
NOW = 1_800_000_000.0


def test_a_token_proves_its_own_id_until_it_expires():
    token = issue_token(SECRET, "host-1", NOW)
    assert verify_token(SECRET, "host-1", token, NOW)
    assert verify_token(SECRET, "host-1", token, NOW + TOKEN_LIFETIME - 1)
    assert not verify_token(SECRET, "host-1", token, NOW + TOKEN_LIFETIME)


def _same_bits(last: str) -> str:
    """Another base64 character that decodes to the same bytes in a token's last place.

    A SHA-256 MAC is 43 characters unpadded: the last one carries 4 bits and 2 spare
    ones, which a lenient decoder ignores.
    """
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return alphabet[alphabet.index(last) ^ 1]


@pytest.mark.parametrize(
    ("agent_id", "token_of"),
    [
        ("host-2", lambda t: t),  # another id
        ("host-1", lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB")),  # forged mac
        ("host-1", lambda t: t.replace(t.split(".")[1], str(int(t.split(".")[1]) + 3600))),
        ("host-1", lambda t: "2" + t[1:]),  # unknown version
        ("host-1", lambda _t: ""),
        ("host-1", lambda _t: "1..."),
        ("host-1", lambda _t: "1.99999999999.!!!!"),
        ("host-1", lambda t: t + "A" * 200),  # too long
        ("host-1", lambda t: t.replace(".", ".0", 1)),  # the expiry with a leading zero
        ("host-1", lambda t: t + "="),  # padded
        ("host-1", lambda t: t[:-1] + _same_bits(t[-1])),  # the MAC's spare bits set
        ("host-1", lambda _t: "1.\u00b2\u00b3.abc"),  # digits, but not ASCII ones
    ],
)
def test_anything_else_is_not_valid(agent_id, token_of):
    token = issue_token(SECRET, "host-1", NOW)
    assert not verify_token(SECRET, agent_id, token_of(token), NOW)


def test_another_secret_does_not_verify():
    token = issue_token(SECRET, "host-1", NOW)
    assert not verify_token(bytes(SECRET_BYTES), "host-1", token, NOW)


def test_an_expired_token_is_refused_even_with_a_good_mac():
    token = issue_token(SECRET, "host-1", NOW - TOKEN_LIFETIME - 10)
    assert not verify_token(SECRET, "host-1", token, NOW)


def test_a_short_secret_is_refused():
    with pytest.raises(ValueError, match="at least"):
        issue_token(b"short", "host-1", NOW)


def test_the_secret_file_is_made_once_owner_only(tmp_path):
    path = tmp_path / "data" / "agent-token.key"
    first = load_or_create_secret(path, SECRET_BYTES)
    assert len(first) == SECRET_BYTES
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert load_or_create_secret(path, SECRET_BYTES) == first
    path.write_bytes(b"truncated")
    again = load_or_create_secret(path, SECRET_BYTES)
    assert len(again) == SECRET_BYTES
    assert again != first

"""Event generations and splay (relay.core.events): table tests."""

from __future__ import annotations

import pytest

from relay.core.events import Generation, Reason, digest, policy_digest, splay_delay_ms
from relay.core.model import Target, UpdateInfo
from relay.core.policy import PolicyState, Settings, approve, decline

P = digest("policy")
S = digest("settings")
GEN = Generation(7, P, S)


@pytest.mark.parametrize(
    ("since", "reasons"),
    [
        (str(GEN), ()),
        (str(Generation(6, P, S)), (Reason.CONTENT,)),
        (str(Generation(7, digest("other"), S)), (Reason.POLICY,)),
        (str(Generation(7, P, digest("other"))), (Reason.SETTINGS,)),
        (str(Generation(1, digest("a"), digest("b"))), tuple(Reason)),
        ("", tuple(Reason)),  # never seen one
        ("7.x.y", tuple(Reason)),  # unreadable
        (f"-1.{P}.{S}", tuple(Reason)),
        (f"7.{P}", tuple(Reason)),
    ],
)
def test_reasons_are_the_parts_that_differ(since, reasons):
    assert GEN.reasons_since(since) == reasons


def test_generation_text_round_trips():
    assert Generation.parse(str(GEN)) == GEN
    assert Generation.parse("1" * 21 + f".{P}.{S}") is None


@pytest.mark.parametrize(
    ("index", "count", "splay", "ms"),
    [
        (0, 1, 30, 0),  # a lone agent is not delayed
        (0, 4, 30, 0),
        (1, 4, 30, 7500),
        (3, 4, 30, 22500),
        (9, 4, 30, 22500),  # late: the last slot
        (5, 0, 30, 0),  # nobody counted: no delay
        (999, 1000, 30, 29970),
        (3, 4, 0, 0),  # no splay
    ],
)
def test_splay_spreads_a_wave_evenly(index, count, splay, ms):
    assert splay_delay_ms(index, count, splay) == ms


def test_splay_refuses_negative_values():
    with pytest.raises(ValueError, match="negative"):
        splay_delay_ms(-1, 3, 30)


def _target(version: str) -> Target:
    info = UpdateInfo.from_dict({"product": "app", "version": version, "kind": "software"})
    return Target(f"app/{version}/app.bin", 10, "a" * 64, info)


def test_policy_digest_changes_only_for_the_groups_concerned():
    v1 = _target("1.0.0")
    base = PolicyState()
    pilot = approve(base, v1, group="pilot")
    every = decline(base, v1)
    assert policy_digest(pilot, Settings(), "default") == policy_digest(base, Settings(), "default")
    assert policy_digest(pilot, Settings(), "pilot") != policy_digest(base, Settings(), "pilot")
    assert policy_digest(every, Settings(), "default") != policy_digest(base, Settings(), "default")
    relays_only = Settings(relays_only=True)
    assert policy_digest(base, relays_only, "x") != policy_digest(base, Settings(), "x")

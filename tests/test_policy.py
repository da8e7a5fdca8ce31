"""The pure policy, a row per rule (DESIGN §3)."""

from __future__ import annotations

import datetime as dt

import pytest

from relay.errors import EulaNotAcceptedError
from relay.model import Kind, Target, UpdateInfo
from relay.policy import (
    Action,
    AgentView,
    InstalledItem,
    PolicyState,
    RolloutMode,
    Settings,
    Status,
    accept_eula,
    approve,
    decline,
    declined_everywhere,
    effective_status,
    offer_for_product,
    offers,
    reset,
    should_prefetch,
)

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)


def T(version, product="app", kind="software", severity="normal", channel="stable", eula=None):
    sha = (product + version).encode().hex().ljust(64, "0")[:64]
    return Target(
        f"{product}/{version}/{product}.bin",
        100,
        sha,
        UpdateInfo(product, version, kind, severity, channel, eula),
    )


V1, V2, V3 = T("1.0.0"), T("1.1.0"), T("2.0.0")
BETA = T("3.0.0-beta.1", channel="beta")
CRIT = T("1.1.1", severity="critical")
SIGS = T("2024.1.0", product="sigs", kind="content")
EULA_T = T("4.0.0", eula="legal/1.0.0/eula.txt")


def agent(group="default", installed=(), first=None, defer=0):
    return AgentView(
        "a",
        group,
        tuple(InstalledItem(t.product, t.version, t.sha256) for t in installed),
        first or {},
        defer,
    )


def st(*changes):
    s = PolicyState()
    for fn, target, kw in changes:
        s = fn(s, target, **kw)
    return s


A = approve
D = decline

CASES = [
    # name, targets, state, settings, agent, expected (action, version or None, mode)
    (
        "undefined software is not offered",
        [V1],
        st(),
        Settings(),
        agent(),
        (Action.NONE, None, "forced"),
    ),
    (
        "approved software is offered",
        [V1],
        st((A, V1, {})),
        Settings(),
        agent(),
        (Action.INSTALL, "1.0.0", "forced"),
    ),
    (
        "undefined content installs by default",
        [SIGS],
        st(),
        Settings(),
        agent(),
        (Action.INSTALL, "2024.1.0", "forced"),
    ),
    (
        "install-undefined off for content",
        [SIGS],
        st(),
        Settings(install_undefined={Kind.CONTENT: False}),
        agent(),
        (Action.NONE, None, "forced"),
    ),
    (
        "newest approved wins",
        [V1, V2, V3],
        st((A, V1, {}), (A, V2, {})),
        Settings(),
        agent(),
        (Action.INSTALL, "1.1.0", "forced"),
    ),
    (
        "already installed: none",
        [V1],
        st((A, V1, {})),
        Settings(),
        agent(installed=[V1]),
        (Action.NONE, "1.0.0", "forced"),
    ),
    (
        "declined never offered",
        [V1],
        st((D, V1, {})),
        Settings(install_undefined={Kind.SOFTWARE: True}),
        agent(),
        (Action.NONE, None, "forced"),
    ),
    (
        "critical auto-approved, forced",
        [V1, CRIT],
        st(),
        Settings(),
        agent(),
        (Action.INSTALL, "1.1.1", "forced"),
    ),
    (
        "critical auto-approval off",
        [CRIT],
        st(),
        Settings(auto_approve_critical=False),
        agent(),
        (Action.NONE, None, "forced"),
    ),
    (
        "critical declined stays declined",
        [CRIT],
        st((D, CRIT, {})),
        Settings(),
        agent(),
        (Action.NONE, None, "forced"),
    ),
    (
        "beta not for default group",
        [V1, BETA],
        st((A, V1, {}), (A, BETA, {})),
        Settings(),
        agent(),
        (Action.INSTALL, "1.0.0", "forced"),
    ),
    (
        "beta for opted-in group",
        [V1, BETA],
        st((A, V1, {}), (A, BETA, {})),
        Settings(beta_groups=frozenset({"pilot"})),
        agent("pilot"),
        (Action.INSTALL, "3.0.0-beta.1", "forced"),
    ),
    (
        "group approval: pilot only",
        [V1, V2],
        st((A, V1, {}), (A, V2, {"group": "pilot"})),
        Settings(),
        agent("pilot"),
        (Action.INSTALL, "1.1.0", "forced"),
    ),
    (
        "group approval: not for default",
        [V1, V2],
        st((A, V1, {}), (A, V2, {"group": "pilot"})),
        Settings(),
        agent(),
        (Action.INSTALL, "1.0.0", "forced"),
    ),
    (
        "group decline overrides all-groups approval",
        [V1, V2],
        st((A, V1, {}), (A, V2, {}), (D, V2, {"group": "pilot"})),
        Settings(),
        agent("pilot"),
        (Action.INSTALL, "1.0.0", "forced"),
    ),
    (
        "group approval overrides all-groups decline",
        [V2],
        st((D, V2, {}), (A, V2, {"group": "pilot"})),
        Settings(),
        agent("pilot"),
        (Action.INSTALL, "1.1.0", "forced"),
    ),
    (
        "declined installed: move back to newest approved",
        [V1, V2, V3],
        st((A, V1, {}), (A, V2, {}), (D, V3, {})),
        Settings(),
        agent(installed=[V3]),
        (Action.ROLLBACK, "1.1.0", "forced"),
    ),
    (
        "declined installed, newer approved: move forward",
        [V1, V2, V3],
        st((A, V1, {}), (D, V2, {}), (A, V3, {})),
        Settings(),
        agent(installed=[V2]),
        (Action.INSTALL, "2.0.0", "forced"),
    ),
    (
        "declined installed, nothing approved: none",
        [V1],
        st((D, V1, {})),
        Settings(),
        agent(installed=[V1]),
        (Action.NONE, None, "forced"),
    ),
    (
        "EULA not accepted: not offered even if undefined-on",
        [EULA_T],
        st(),
        Settings(install_undefined={Kind.SOFTWARE: True}),
        agent(),
        (Action.NONE, None, "forced"),
    ),
    (
        "EULA accepted then approved: offered",
        [EULA_T],
        approve(accept_eula(PolicyState(), "legal/1.0.0/eula.txt"), EULA_T),
        Settings(),
        agent(),
        (Action.INSTALL, "4.0.0", "forced"),
    ),
    (
        "on-demand from settings",
        [V1],
        st((A, V1, {"mode": RolloutMode.ON_DEMAND})),
        Settings(),
        agent(),
        (Action.INSTALL, "1.0.0", "on-demand"),
    ),
]


@pytest.mark.parametrize(
    ("name", "targets", "state", "settings", "view", "expected"), CASES, ids=[c[0] for c in CASES]
)
def test_offer_rules(name, targets, state, settings, view, expected):
    product = targets[0].product
    offer = offer_for_product(product, targets, state, settings, view, NOW)
    action, version, mode = expected
    assert offer.action is action
    assert (offer.target.version if offer.target else None) == version
    assert str(offer.mode) == mode


@pytest.mark.parametrize("days", [1, 3, 7])
def test_on_demand_deadline_from_first_offer_plus_deferral(days):
    state = approve(PolicyState(), V2, mode=RolloutMode.ON_DEMAND)
    first = NOW - dt.timedelta(hours=5)
    view = agent(first={("app", "1.1.0"): first}, defer=days)
    offer = offer_for_product("app", [V2], state, Settings(), view, NOW)
    assert offer.mode is RolloutMode.ON_DEMAND
    assert offer.deadline == first + dt.timedelta(days=days)
    # Past the deadline it is forced (the deadline stays in the offer).
    late = offer_for_product(
        "app", [V2], state, Settings(), view, first + dt.timedelta(days=days, seconds=1)
    )
    assert late.mode is RolloutMode.FORCED and late.deadline == offer.deadline


def test_deferral_not_offered_falls_back_to_the_smallest_choice():
    state = approve(PolicyState(), V2, mode=RolloutMode.ON_DEMAND)
    offer = offer_for_product(
        "app", [V2], state, Settings(deferral_days=(3, 7)), agent(defer=1), NOW
    )
    assert offer.deadline == NOW + dt.timedelta(days=3)


def test_eula_gate_on_approve():
    with pytest.raises(EulaNotAcceptedError):
        approve(PolicyState(), EULA_T)
    state = approve(accept_eula(PolicyState(), "legal/1.0.0/eula.txt"), EULA_T)
    assert effective_status(state, Settings(), EULA_T, "default") is Status.APPROVED


def test_critical_with_eula_is_not_auto_approved_before_acceptance():
    crit_eula = T("5.0.0", severity="critical", eula="legal/1.0.0/eula.txt")
    assert effective_status(PolicyState(), Settings(), crit_eula, "default") is Status.UNDEFINED
    accepted = accept_eula(PolicyState(), "legal/1.0.0/eula.txt")
    assert effective_status(accepted, Settings(), crit_eula, "default") is Status.APPROVED


def test_reset_and_offers_for_all_products():
    state = reset(approve(PolicyState(), V1), V1)
    assert effective_status(state, Settings(), V1, "default") is Status.UNDEFINED
    result = offers([V1, SIGS], approve(PolicyState(), V1), Settings(), agent(), NOW)
    assert [(o.product, o.action) for o in result] == [
        ("app", Action.INSTALL),
        ("sigs", Action.INSTALL),
    ]


def test_prefetch_and_pins():
    s = Settings()
    assert should_prefetch(PolicyState(), s, SIGS, ["default"])  # content: as soon as verified
    assert not should_prefetch(PolicyState(), s, V1, ["default"])  # software waits for approval
    assert should_prefetch(approve(PolicyState(), V1, group="pilot"), s, V1, ["default", "pilot"])
    declined = decline(PolicyState(), SIGS)
    assert not should_prefetch(declined, s, SIGS, ["default"])
    assert declined_everywhere(declined, s, SIGS, ["default", "pilot"])


def test_round_trips_and_validation():
    state = accept_eula(
        decline(
            approve(PolicyState(), V1, group="pilot", mode=RolloutMode.ON_DEMAND, at="t", by="me"),
            V2,
        ),
        "x",
    )
    assert PolicyState.from_dict(state.to_dict()) == state
    settings = Settings(beta_groups=frozenset({"pilot"}), rollout_mode=RolloutMode.ON_DEMAND)
    assert Settings.from_dict(settings.to_dict()) == settings
    for bad, field in [
        ({"rollout_mode": "soon"}, "rollout_mode"),
        ({"beta_groups": "pilot"}, "beta_groups"),
        ({"install_undefined": {"firmware": True}}, "install_undefined.firmware"),
        ({"deferral_days": [0]}, "deferral_days"),
        ({"colour": 1}, "colour"),
    ]:
        with pytest.raises(ValueError, match=field):
            Settings.from_dict(bad)
    with pytest.raises(ValueError, match=r"approvals\[0\]"):
        PolicyState.from_dict({"approvals": [{"product": "a"}]})


def test_pins_are_approved_and_currently_offered_versions_only():
    from relay.policy import pinned_digests

    old_sigs, new_sigs = (
        T("2024.1.0", product="sigs", kind="content"),
        T("2024.2.0", product="sigs", kind="content"),
    )
    state = approve(decline(PolicyState(), V3), V1)
    pins = pinned_digests([V1, V2, V3, old_sigs, new_sigs], state, Settings(), ["default"])
    # V1 approved (and offered); V2 undefined software: not pinned; V3 declined: not pinned;
    # of the content, only the version offered now (the newest) is pinned.
    assert pins == {V1.sha256, new_sigs.sha256}

"""The pure policy, a row per rule (docs/PROTOCOL.md and the rules in relay/core/policy.py)."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field

import pytest

from relay.core.model import Kind, Target, UpdateInfo
from relay.core.policy import (
    Action,
    AgentView,
    Approval,
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
    pinned_digests,
    pinned_versions,
    reset,
    should_prefetch,
)
from relay.errors import EulaNotAcceptedError

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
LICENCE = "legal/1.0.0/eula.txt"


def T(version, product="app", kind="software", severity="normal", channel="stable", eula=None):
    sha = (product + version).encode().hex().ljust(64, "0")[:64]
    return Target(
        f"{product}/{version}/{product}.bin",
        100,
        sha,
        UpdateInfo(product, version, kind, severity, channel, eula),
    )


V1, V2, V3, V4 = T("1.0.0"), T("1.1.0"), T("2.0.0"), T("2.1.0")
BETA = T("3.0.0-beta.1", channel="beta")
CRIT = T("1.1.1", severity="critical")
CRIT_EULA = T("5.0.0", severity="critical", eula=LICENCE)
SIGS = T("2024.1.0", product="sigs", kind="content")
SIGS_EULA = T("2024.2.0", product="sigs", kind="content", eula=LICENCE)
CONF = T("1.0.0", product="conf", kind="config")
EULA_T = T("4.0.0", eula=LICENCE)


def agent(group="default", installed=(), first=None, defer=0, sha=None):
    items = tuple(InstalledItem(t.product, t.version, sha or t.sha256) for t in installed)
    return AgentView("a", group, items, first or {}, defer)


def st(*changes, eulas=()):
    s = PolicyState()
    for eula in eulas:
        s = accept_eula(s, eula)
    for fn, target, kw in changes:
        s = fn(s, target, **kw)
    return s


A, D = approve, decline
ON_DEMAND = {"mode": RolloutMode.ON_DEMAND}
UNDEFINED_ON = Settings(install_undefined={Kind.SOFTWARE: True})


@dataclass
class Row:
    name: str
    targets: list
    state: PolicyState = field(default_factory=PolicyState)
    settings: Settings = field(default_factory=Settings)
    view: AgentView = field(default_factory=agent)
    action: Action = Action.NONE
    version: str | None = None  # version of the offered target (None: no target)
    mode: RolloutMode = RolloutMode.FORCED


ROWS = [
    # Rule 3: what is offerable.
    Row("undefined software is not offered", [V1]),
    Row(
        "approved software is offered",
        [V1],
        st((A, V1, {})),
        action=Action.INSTALL,
        version="1.0.0",
    ),
    Row(
        "undefined content is offered by default", [SIGS], action=Action.INSTALL, version="2024.1.0"
    ),
    Row("undefined config waits by default", [CONF]),
    Row(
        "install-undefined off for content",
        [SIGS],
        settings=Settings(install_undefined={Kind.CONTENT: False}),
    ),
    Row(
        "install-undefined on for software",
        [V1, V2],
        settings=UNDEFINED_ON,
        action=Action.INSTALL,
        version="1.1.0",
    ),
    Row("declined is never offered", [V1], st((D, V1, {})), UNDEFINED_ON),
    Row(
        "newest offerable wins (SemVer), undefined newer ignored",
        [V1, V3, V2],
        st((A, V1, {}), (A, V2, {})),
        action=Action.INSTALL,
        version="1.1.0",
    ),
    # Rule 4c-4e: what the agent already has.
    Row(
        "has the newest: none, pointing at it",
        [V1],
        st((A, V1, {})),
        view=agent(installed=[V1]),
        version="1.0.0",
    ),
    Row(
        "same version, other sha256: install (repair)",
        [V1],
        st((A, V1, {})),
        view=agent(installed=[V1], sha="f" * 64),
        action=Action.INSTALL,
        version="1.0.0",
    ),
    Row(
        "older installed: install the newest",
        [V1, V2],
        st((A, V1, {}), (A, V2, {})),
        view=agent(installed=[V1]),
        action=Action.INSTALL,
        version="1.1.0",
    ),
    Row(
        "newer installed, not declined: none, no move back",
        [V1, V2, V3],
        st((A, V1, {})),
        view=agent(installed=[V3]),
    ),
    Row(
        "installed version unknown to the metadata and newer: none",
        [V1],
        st((A, V1, {})),
        view=AgentView("a", installed=(InstalledItem("app", "9.0.0", "e" * 64),)),
    ),
    Row(
        "installed version not SemVer: install",
        [V1],
        st((A, V1, {})),
        view=AgentView("a", installed=(InstalledItem("app", "build-7", "e" * 64),)),
        action=Action.INSTALL,
        version="1.0.0",
    ),
    # Rule 1: critical auto-approval.
    Row(
        "critical auto-approved and forced",
        [V1, CRIT],
        settings=Settings(rollout_mode=RolloutMode.ON_DEMAND),
        action=Action.INSTALL,
        version="1.1.1",
    ),
    Row(
        "critical explicitly approved on-demand keeps its mode",
        [CRIT],
        st((A, CRIT, ON_DEMAND)),
        action=Action.INSTALL,
        version="1.1.1",
        mode=RolloutMode.ON_DEMAND,
    ),
    Row("critical auto-approval off", [CRIT], settings=Settings(auto_approve_critical=False)),
    Row("critical declined stays declined", [CRIT], st((D, CRIT, {}))),
    # Rule 3: beta channel.
    Row(
        "beta not for a group that did not opt in",
        [V1, BETA],
        st((A, V1, {}), (A, BETA, {})),
        Settings(beta_groups=frozenset({"pilot"})),
        action=Action.INSTALL,
        version="1.0.0",
    ),
    Row(
        "beta for an opted-in group",
        [V1, BETA],
        st((A, V1, {}), (A, BETA, {})),
        Settings(beta_groups=frozenset({"pilot"})),
        agent("pilot"),
        Action.INSTALL,
        "3.0.0-beta.1",
    ),
    Row(
        "beta critical not auto-offered outside beta groups",
        [T("6.0.0-rc.1", severity="critical", channel="beta")],
    ),
    # Rule 1: group status overrides the all-groups one.
    Row(
        "pilot approved, all groups declined: pilot gets it",
        [V1, V2],
        st((A, V1, {}), (D, V2, {}), (A, V2, {"group": "pilot"})),
        view=agent("pilot"),
        action=Action.INSTALL,
        version="1.1.0",
    ),
    Row(
        "pilot approved, all groups declined: default does not",
        [V1, V2],
        st((A, V1, {}), (D, V2, {}), (A, V2, {"group": "pilot"})),
        action=Action.INSTALL,
        version="1.0.0",
    ),
    Row(
        "all groups approved, pilot declined: pilot does not",
        [V1, V2],
        st((A, V1, {}), (A, V2, {}), (D, V2, {"group": "pilot"})),
        view=agent("pilot"),
        action=Action.INSTALL,
        version="1.0.0",
    ),
    Row(
        "all groups approved, pilot declined: default gets it",
        [V1, V2],
        st((A, V1, {}), (A, V2, {}), (D, V2, {"group": "pilot"})),
        action=Action.INSTALL,
        version="1.1.0",
    ),
    # Rule 4b: leaving a declined version.
    Row(
        "declined installed: move back to the newest approved older one",
        [V1, V2, V3, V4],
        st((A, V1, {}), (A, V2, {}), (D, V3, {})),
        view=agent(installed=[V3]),
        action=Action.ROLLBACK,
        version="1.1.0",
    ),
    Row(
        "declined for the agent's group only: that group moves back",
        [V1, V2],
        st((A, V1, {}), (A, V2, {}), (D, V2, {"group": "pilot"})),
        view=agent("pilot", installed=[V2]),
        action=Action.ROLLBACK,
        version="1.0.0",
    ),
    Row(
        "declined for another group: this one keeps it",
        [V1, V2],
        st((A, V1, {}), (A, V2, {}), (D, V2, {"group": "pilot"})),
        view=agent(installed=[V2]),
        version="1.1.0",
    ),
    Row(
        "move back is forced even when the target's approval is on-demand",
        [V1, V2],
        st((A, V1, ON_DEMAND), (D, V2, {})),
        view=agent(installed=[V2]),
        action=Action.ROLLBACK,
        version="1.0.0",
    ),
    Row(
        "declined installed, newer approved: move forward, forced",
        [V1, V2, V3],
        st((A, V1, {}), (D, V2, {}), (A, V3, ON_DEMAND)),
        view=agent(installed=[V2]),
        action=Action.INSTALL,
        version="2.0.0",
    ),
    Row(
        "declined installed, nothing offerable: uninstall it, forced",
        [V1],
        st((D, V1, {})),
        view=agent(installed=[V1]),
        action=Action.UNINSTALL,
        version="1.0.0",
    ),
    Row(
        "declined installed, the newer one not approved: uninstall the declined one",
        [V1, V2],
        st((D, V1, {})),
        view=agent(installed=[V1]),
        action=Action.UNINSTALL,
        version="1.0.0",
    ),
    Row(
        "declined for another group, nothing offerable here: none, no uninstall",
        [V1],
        st((D, V1, {"group": "pilot"})),
        view=agent(installed=[V1]),
    ),
    # Rule 2: the EULA gate.
    Row(
        "EULA not accepted: not offered even with install-undefined",
        [EULA_T],
        settings=UNDEFINED_ON,
    ),
    Row(
        "EULA accepted then approved: offered",
        [EULA_T],
        st((A, EULA_T, {}), eulas=[LICENCE]),
        action=Action.INSTALL,
        version="4.0.0",
    ),
    Row(
        "undefined content naming an EULA: not offered before acceptance",
        [SIGS, SIGS_EULA],
        action=Action.INSTALL,
        version="2024.1.0",
    ),
    Row(
        "undefined content naming an EULA: offered once accepted",
        [SIGS, SIGS_EULA],
        st(eulas=[LICENCE]),
        action=Action.INSTALL,
        version="2024.2.0",
    ),
    Row("critical naming an EULA: not auto-approved before acceptance", [CRIT_EULA]),
    Row(
        "critical naming an EULA: auto-approved once accepted",
        [CRIT_EULA],
        st(eulas=[LICENCE]),
        action=Action.INSTALL,
        version="5.0.0",
    ),
    Row(
        "an approval copied without the EULA accepted is not offered",
        [EULA_T],
        PolicyState({("app", "4.0.0", None): Approval(Status.APPROVED)}),
    ),
    # Rule 5: mode.
    Row(
        "on-demand from the approval",
        [V1],
        st((A, V1, ON_DEMAND)),
        action=Action.INSTALL,
        version="1.0.0",
        mode=RolloutMode.ON_DEMAND,
    ),
    Row(
        "forced approval wins over on-demand settings",
        [V1],
        st((A, V1, {})),
        Settings(rollout_mode=RolloutMode.ON_DEMAND),
        action=Action.INSTALL,
        version="1.0.0",
    ),
    Row(
        "undefined content takes the settings' mode",
        [SIGS],
        settings=Settings(rollout_mode=RolloutMode.ON_DEMAND),
        action=Action.INSTALL,
        version="2024.1.0",
        mode=RolloutMode.ON_DEMAND,
    ),
    Row(
        "group approval's mode over the all-groups one",
        [V1],
        st((A, V1, {}), (A, V1, {"group": "pilot", **ON_DEMAND})),
        view=agent("pilot"),
        action=Action.INSTALL,
        version="1.0.0",
        mode=RolloutMode.ON_DEMAND,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_offer_rules(row):
    offer = offer_for_product(
        row.targets[0].product, row.targets, row.state, row.settings, row.view, NOW
    )
    assert offer.product == row.targets[0].product
    assert offer.action is row.action
    assert (offer.target.version if offer.target else None) == row.version
    assert offer.mode is row.mode
    # A deadline exactly when the offer is an on-demand install.
    assert (offer.deadline is not None) == (offer.mode is RolloutMode.ON_DEMAND)


def test_rows_are_unique():
    assert len({r.name for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("days", [1, 3, 7])
def test_on_demand_deadline_is_first_offer_plus_deferral_then_forced(days):
    state = approve(PolicyState(), V2, mode=RolloutMode.ON_DEMAND)
    first = NOW - dt.timedelta(hours=5)
    view = agent(first={("app", "1.1.0"): first}, defer=days)
    offer = offer_for_product("app", [V2], state, Settings(), view, NOW)
    assert offer.mode is RolloutMode.ON_DEMAND
    assert offer.deadline == first + dt.timedelta(days=days)
    just_before = first + dt.timedelta(days=days) - dt.timedelta(seconds=1)
    assert offer_for_product("app", [V2], state, Settings(), view, just_before).mode is (
        RolloutMode.ON_DEMAND
    )
    # From the deadline on it is forced, and the deadline stays in the offer.
    for late in (first + dt.timedelta(days=days), first + dt.timedelta(days=days + 30)):
        forced = offer_for_product("app", [V2], state, Settings(), view, late)
        assert forced.action is Action.INSTALL
        assert forced.mode is RolloutMode.FORCED and forced.deadline == offer.deadline


@pytest.mark.parametrize(
    ("choices", "defer", "expected_days"),
    [
        ((1, 3, 7), 0, 1),  # no choice made: the smallest
        ((3, 7), 1, 3),  # a choice not allowed: the smallest allowed
        ((3, 7), 7, 7),
        ((7, 2), 0, 2),
    ],
)
def test_deferral_choice(choices, defer, expected_days):
    state = approve(PolicyState(), V2, mode=RolloutMode.ON_DEMAND)
    settings = Settings(deferral_days=choices)
    offer = offer_for_product("app", [V2], state, settings, agent(defer=defer), NOW)
    # Never offered before: the deadline counts from now.
    assert offer.deadline == NOW + dt.timedelta(days=expected_days)


def test_deadline_counts_from_the_first_offer_of_that_version_only():
    state = approve(
        approve(PolicyState(), V1, mode=RolloutMode.ON_DEMAND), V2, mode=RolloutMode.ON_DEMAND
    )
    view = agent(first={("app", "1.0.0"): NOW - dt.timedelta(days=10)}, defer=3)
    offer = offer_for_product("app", [V1, V2], state, Settings(), view, NOW)
    assert offer.target == V2 and offer.mode is RolloutMode.ON_DEMAND
    assert offer.deadline == NOW + dt.timedelta(days=3)


def test_eula_gate_on_approve():
    with pytest.raises(EulaNotAcceptedError, match=LICENCE):
        approve(PolicyState(), EULA_T)
    with pytest.raises(EulaNotAcceptedError):
        approve(accept_eula(PolicyState(), "legal/2.0.0/other.txt"), EULA_T, group="pilot")
    state = approve(
        accept_eula(PolicyState(), LICENCE), EULA_T, at="2026-11-24T12:00:00Z", by="ops"
    )
    assert effective_status(state, Settings(), EULA_T, "default") is Status.APPROVED
    assert state.approvals[("app", "4.0.0", None)] == Approval(
        Status.APPROVED, RolloutMode.FORCED, "2026-11-24T12:00:00Z", "ops"
    )
    with pytest.raises(ValueError, match="eula_path"):
        accept_eula(PolicyState(), "")


def test_critical_naming_an_eula_stays_undefined_until_accepted():
    assert effective_status(PolicyState(), Settings(), CRIT_EULA, "default") is Status.UNDEFINED
    accepted = accept_eula(PolicyState(), LICENCE)
    assert effective_status(accepted, Settings(), CRIT_EULA, "default") is Status.APPROVED


def test_effective_status_and_reset():
    state = decline(approve(PolicyState(), V1), V1, group="pilot")
    assert effective_status(state, Settings(), V1, "pilot") is Status.DECLINED
    assert effective_status(state, Settings(), V1, "default") is Status.APPROVED
    assert effective_status(state, Settings(), V1, None) is Status.APPROVED
    # Resetting the group's decision falls back to the all-groups one, then undefined.
    state = reset(state, V1, group="pilot")
    assert effective_status(state, Settings(), V1, "pilot") is Status.APPROVED
    state = reset(state, V1)
    assert effective_status(state, Settings(), V1, "pilot") is Status.UNDEFINED
    assert state.approvals == {}
    assert reset(state, V2) == state
    # Critical: approved automatically, unless declined or the setting is off.
    assert effective_status(PolicyState(), Settings(), CRIT, "default") is Status.APPROVED
    assert effective_status(decline(PolicyState(), CRIT), Settings(), CRIT, "x") is Status.DECLINED
    off = Settings(auto_approve_critical=False)
    assert effective_status(PolicyState(), off, CRIT, "default") is Status.UNDEFINED
    # An entry stored as undefined is no decision: the all-groups one applies.
    stored = PolicyState(
        {
            ("app", "1.0.0", "pilot"): Approval(Status.UNDEFINED),
            ("app", "1.0.0", None): Approval(Status.DECLINED),
        }
    )
    assert effective_status(stored, Settings(), V1, "pilot") is Status.DECLINED


def test_offers_cover_every_product_sorted():
    sigs_other = T("1.0.0", product="other", kind="content")
    view = AgentView(
        "a",
        installed=(
            InstalledItem("app", "1.0.0", V1.sha256),
            InstalledItem("gone", "1.0.0", "d" * 64),
        ),
    )
    state = approve(PolicyState(), V2)
    result = offers([sigs_other, V2, V1, SIGS, CONF], state, Settings(), view, NOW)
    got = [(o.product, o.action, o.target.version if o.target else None) for o in result]
    assert got == [
        ("app", Action.INSTALL, "1.1.0"),
        ("conf", Action.NONE, None),  # nothing offerable: none, no target
        ("gone", Action.NONE, None),  # installed but unknown to the metadata
        ("other", Action.INSTALL, "1.0.0"),  # new install
        ("sigs", Action.INSTALL, "2024.1.0"),
    ]


def test_prefetch_follows_policy():
    s = Settings()
    assert should_prefetch(PolicyState(), s, SIGS, ["default"])  # content: as soon as verified
    assert not should_prefetch(PolicyState(), s, V1, ["default"])  # software waits for approval
    assert should_prefetch(approve(PolicyState(), V1), s, V1, [])  # no groups: the default one
    assert should_prefetch(approve(PolicyState(), V1, group="pilot"), s, V1, ["default", "pilot"])
    assert not should_prefetch(approve(PolicyState(), V1, group="pilot"), s, V1, ["default"])
    assert should_prefetch(PolicyState(), s, CRIT, ["default"])  # auto-approved
    # EULA: not before acceptance, even for content.
    assert not should_prefetch(PolicyState(), s, SIGS_EULA, ["default"])
    assert should_prefetch(accept_eula(PolicyState(), LICENCE), s, SIGS_EULA, ["default"])
    # Beta: only when a known group takes beta.
    beta_sigs = T("2025.0.0-beta.1", product="sigs", kind="content", channel="beta")
    assert not should_prefetch(PolicyState(), s, beta_sigs, ["default", "pilot"])
    betas = Settings(beta_groups=frozenset({"pilot"}))
    assert should_prefetch(PolicyState(), betas, beta_sigs, ["default", "pilot"])


@pytest.mark.parametrize(
    ("state", "settings", "target"),
    [
        (decline(PolicyState(), SIGS), Settings(), SIGS),
        (decline(PolicyState(), CRIT), Settings(), CRIT),
        (decline(PolicyState(), V1), Settings(install_undefined={Kind.SOFTWARE: True}), V1),
        (decline(decline(PolicyState(), V1, group="pilot"), V1, group="default"), Settings(), V1),
    ],
)
def test_declined_is_never_prefetched_nor_pinned(state, settings, target):
    groups = ["default", "pilot"]
    assert not should_prefetch(state, settings, target, groups)
    assert declined_everywhere(state, settings, target, groups)
    assert target not in pinned_versions([target], state, settings, groups, keep_versions=3)
    assert target.sha256 not in pinned_digests([target], state, settings, groups)


def test_declined_everywhere_needs_every_group():
    state = approve(decline(PolicyState(), V1), V1, group="pilot")
    assert not declined_everywhere(state, Settings(), V1, ["default", "pilot"])
    assert declined_everywhere(state, Settings(), V1, ["default"])
    assert declined_everywhere(decline(PolicyState(), V1), Settings(), V1, [])
    assert not declined_everywhere(PolicyState(), Settings(), V1, [])


def test_pins_are_approved_and_currently_offered_versions():
    old_sigs, new_sigs = SIGS, T("2024.2.0", product="sigs", kind="content")
    state = approve(decline(PolicyState(), V3), V1)
    pins = pinned_digests([V1, V2, V3, old_sigs, new_sigs], state, Settings(), ["default"])
    # V1 approved (and offered); V2 undefined software: not pinned; V3 declined: not pinned;
    # of the content, only the version offered now (the newest) is pinned.
    assert pins == {V1.sha256, new_sigs.sha256}


def test_pinned_versions_keep_the_newest_n_not_declined():
    state = approve(decline(PolicyState(), V4), V1, group="pilot")
    targets = [V4, V3, V2, V1]
    groups = ["default", "pilot"]
    assert pinned_versions(targets, state, Settings(), groups) == {V1}
    # The newest two not declined everywhere, plus the approved V1.
    assert pinned_versions(targets, state, Settings(), groups, keep_versions=2) == {V3, V2, V1}
    assert pinned_versions(targets, state, Settings(), groups, keep_versions=10) == {V3, V2, V1}
    with pytest.raises(ValueError, match="keep_versions"):
        pinned_versions(targets, state, Settings(), groups, keep_versions=-1)


def test_policy_state_round_trips_through_json():
    state = accept_eula(
        decline(
            approve(
                PolicyState(),
                V1,
                group="pilot",
                mode=RolloutMode.ON_DEMAND,
                at="2026-11-24T12:00:00Z",
                by="me",
            ),
            V2,
        ),
        LICENCE,
    )
    state = approve(state, V1)
    data = json.loads(json.dumps(state.to_dict()))
    assert PolicyState.from_dict(data) == state
    assert PolicyState.from_dict({}) == PolicyState()
    assert PolicyState.from_dict(PolicyState().to_dict()) == PolicyState()


def test_settings_round_trip_through_json():
    settings = Settings(
        auto_approve_critical=False,
        install_undefined={Kind.SOFTWARE: True, Kind.CONTENT: False},
        beta_groups=frozenset({"pilot", "lab"}),
        rollout_mode=RolloutMode.ON_DEMAND,
        deferral_days=(7, 1),
        relays_only=True,
    )
    data = json.loads(json.dumps(settings.to_dict()))
    assert Settings.from_dict(data) == settings
    assert Settings.from_dict({}) == Settings()
    # A partial install_undefined keeps the defaults of the kinds it does not name.
    assert Settings(install_undefined={Kind.SOFTWARE: True}).install_undefined == {
        Kind.SOFTWARE: True,
        Kind.CONTENT: True,
        Kind.CONFIG: False,
    }
    assert Settings.from_dict(
        {"install_undefined": {"config": True}}, base=settings
    ).install_undefined == {
        Kind.SOFTWARE: True,
        Kind.CONTENT: False,
        Kind.CONFIG: True,
    }
    assert Settings.from_dict({"relays_only": True}).relays_only is True
    assert Settings.from_dict({"auto_approve_critical": False}).auto_approve_critical is False


@pytest.mark.parametrize(
    ("bad", "field_name"),
    [
        ({"auto_approve_critical": "yes"}, "auto_approve_critical"),
        ({"relays_only": 1}, "relays_only"),
        ({"rollout_mode": "soon"}, "rollout_mode"),
        ({"beta_groups": "pilot"}, "beta_groups"),
        ({"beta_groups": [""]}, "beta_groups"),
        ({"install_undefined": ["content"]}, "install_undefined"),
        ({"install_undefined": {"firmware": True}}, "install_undefined.firmware"),
        ({"install_undefined": {"content": "on"}}, "install_undefined.content"),
        ({"deferral_days": [0]}, "deferral_days"),
        ({"deferral_days": []}, "deferral_days"),
        ({"deferral_days": [True]}, "deferral_days"),
        ({"deferral_days": "3"}, "deferral_days"),
        ({"deferral_days": [3, 3]}, "deferral_days"),
        ({"deferral_days": [366]}, "deferral_days"),
        ({"colour": 1}, "colour"),
        ({"poll_seconds": 60}, "poll_seconds"),  # a relay key of [policy], not a setting
    ],
)
def test_settings_from_dict_names_the_bad_field(bad, field_name):
    with pytest.raises(ValueError, match=rf"^{field_name}:"):
        Settings.from_dict(bad)


def test_settings_keep_the_beta_groups_order_and_are_read_only():
    settings = Settings.from_dict({"beta_groups": ["pilot", "it"]})
    assert settings.beta_groups == ("pilot", "it")
    assert settings.to_dict()["beta_groups"] == ["pilot", "it"]
    assert Settings.from_dict(settings.to_dict()) == settings
    with pytest.raises(TypeError):
        settings.install_undefined[Kind.CONFIG] = True  # type: ignore[index]


def test_settings_constructor_checks_deferrals():
    with pytest.raises(ValueError, match="deferral_days"):
        Settings(deferral_days=())
    with pytest.raises(ValueError, match="deferral_days"):
        Settings(deferral_days=(3, -1))


@pytest.mark.parametrize(
    ("bad", "field_name"),
    [
        ({"approvals": {}}, r"approvals:"),
        ({"approvals": ["x"]}, r"approvals\[0\]:"),
        ({"approvals": [{"version": "1.0.0", "status": "approved"}]}, r"approvals\[0\]\.product"),
        ({"approvals": [{"product": "a", "status": "approved"}]}, r"approvals\[0\]\.version"),
        ({"approvals": [{"product": "a", "version": "1.0.0"}]}, r"approvals\[0\]\.status"),
        (
            {"approvals": [{"product": "a", "version": "1.0.0", "status": "maybe"}]},
            r"approvals\[0\]\.status",
        ),
        (
            {
                "approvals": [
                    {"product": "a", "version": "1.0.0", "status": "approved", "mode": "x"}
                ]
            },
            r"approvals\[0\]\.mode",
        ),
        (
            {"approvals": [{"product": "a", "version": "1.0.0", "status": "approved", "group": 3}]},
            r"approvals\[0\]\.group",
        ),
        (
            {"approvals": [{"product": "a", "version": "1.0.0", "status": "approved", "by": 3}]},
            r"approvals\[0\]\.by",
        ),
        ({"eulas_accepted": "legal/1.0.0/eula.txt"}, "eulas_accepted"),
    ],
)
def test_policy_state_from_dict_names_the_bad_field(bad, field_name):
    with pytest.raises(ValueError, match=rf"^{field_name}"):
        PolicyState.from_dict(bad)

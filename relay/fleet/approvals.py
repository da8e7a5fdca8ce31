"""Persistent policy: approvals, settings and the audit log, over the state store.

Rules:

* The pure decisions live in :mod:`relay.core.policy`; this module only loads, saves
  and records them. Every change is saved before it is answered, and appended to
  the audit log with when, what and from where.
* A relay in ``replica`` mode takes state and settings whole from its parent and
  refuses local changes (:class:`relay.errors.ReplicaReadOnlyError`).
* Settings precedence, per key: built-in defaults < the file < ``RELAY_POLICY__*``
  variables < flags (together: the configured value) < a value saved through the
  admin API (``PUT /v1/admin/settings``). The store keeps which keys were saved: a
  saved key overrides the configuration, every other key follows it, at start and on
  each reload (:meth:`PolicyStore.set_defaults`). Saving ``null`` for a key forgets
  it (it follows the configuration again). A replica's settings are its parent's,
  every key of them. Group agent settings follow the same rule (only the keys set
  per group are kept).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from relay.config import Config, PolicySettings
from relay.core.policy import PolicyState, Settings
from relay.core.protocol import now_rfc3339
from relay.core.schedule import GroupSettings
from relay.core.schema import project
from relay.errors import ReplicaReadOnlyError
from relay.storage.kv import KV

_STATE = "policy:state"
_LEGACY_SETTINGS = "policy:settings"  # every key, saved or not (read once, to migrate)
_SAVED = "policy:saved-settings"  # only the keys set through the admin API, JSON form
_GROUPS = "policy:group-settings"


def override_lines(store: PolicyStore, config: Config) -> list[str]:
    """One line per saved setting that overrides the configured value, for the log.

    Args:
        store: the policy store, with the configured settings set.
        config: the configuration, to name where each configured value came from.

    Returns:
        Lines such as ``policy.relays_only = true (saved through the admin API)
        overrides false (/etc/relay/relay.toml)``.
    """
    return [
        f"policy.{key} = {json.dumps(saved)} (saved through the admin API) overrides "
        f"{json.dumps(configured)} ({config.sources.get(f'policy.{key}', 'the default')}); "
        f"`relay admin settings --unset {key}` follows the configuration again"
        for key, saved, configured in store.overrides()
    ]


def settings_from_config(policy: PolicySettings) -> Settings:
    """Return the settings a fresh relay starts with: the :class:`Settings` part of ``[policy]``.

    Args:
        policy: the ``[policy]`` section (a :class:`Settings` extended with relay keys).

    Returns:
        The policy settings alone (what the admin API shows and replicas copy).
    """
    return project(Settings, policy)


class PolicyStore:
    """Approvals and settings of one relay, persisted, with an audit log.

    Attributes:
        defaults: the configured settings (``[policy]`` of the file, variables, flags).
        saved: the settings saved through the admin API (or copied from a parent), in
            their JSON form, by key; they override ``defaults`` key by key.
        settings: the settings in force: ``defaults`` with ``saved`` on top.
    """

    def __init__(
        self,
        kv: KV,
        defaults: Settings,
        *,
        replica: bool = False,
        group_defaults: GroupSettings | None = None,
    ) -> None:
        self._kv = kv
        self.defaults = defaults
        self.replica = replica
        self.state = PolicyState()
        self.settings = defaults
        self.saved: dict[str, Any] = {}
        self.version = 0  # bumped on every change (cheap change detection)
        self.group_defaults = group_defaults or GroupSettings()
        # The agent settings an administrator set per group (JSON form, only the keys
        # set): the other keys follow the defaults, which follow the configuration.
        self.groups: dict[str, dict[str, Any]] = {}
        self.listeners: list[Callable[[], None]] = []  # called after every change

    async def load(self) -> None:
        """Read state and saved settings (defaults for what is missing).

        A state database written before saved keys were tracked holds every key; the
        keys whose value differs from the configured one count as saved.
        """
        raw_state = await self._kv.get(_STATE)
        if isinstance(raw_state, dict):
            self.state = PolicyState.from_dict(raw_state)
        raw_saved = await self._kv.get(_SAVED)
        if not isinstance(raw_saved, dict):
            legacy = await self._kv.get(_LEGACY_SETTINGS)
            configured = self.defaults.to_dict()
            raw_saved = (
                {k: v for k, v in legacy.items() if configured.get(k) != v}
                if isinstance(legacy, dict)
                else {}
            )
        self.settings = Settings.from_dict(raw_saved, base=self.defaults)
        self.saved = {k: self.settings.to_dict()[k] for k in raw_saved}
        raw_groups = await self._kv.get(_GROUPS)
        if isinstance(raw_groups, dict):
            self.groups = group_overrides(raw_groups, self.group_defaults)

    def set_defaults(self, defaults: Settings) -> bool:
        """Replace the configured settings (the configuration was re-read).

        Keys never saved through the admin API follow the new configuration; saved
        keys keep their saved values.

        Returns:
            Whether the settings in force changed.
        """
        self.defaults = defaults
        settings = Settings.from_dict(self.saved, base=defaults)
        if settings == self.settings:
            return False
        self.settings = settings
        self.version += 1
        self._changed()
        return True

    def overrides(self) -> list[tuple[str, Any, Any]]:
        """Return ``(key, saved value, configured value)`` for each saved key that differs.

        Values are in their JSON form.
        """
        configured = self.defaults.to_dict()
        return [
            (key, value, configured[key])
            for key, value in sorted(self.saved.items())
            if configured.get(key) != value
        ]

    async def save_settings(self, changes: Mapping[str, Any], audit: dict[str, Any]) -> Settings:
        """Save settings changed through the admin API; a ``None`` value forgets the key.

        Args:
            changes: keys and JSON values; ``None`` makes the key follow the
                configuration again.
            audit: what to record in the audit log.

        Returns:
            The settings now in force.

        Raises:
            ValueError: an unknown key or a malformed value (nothing changed).
            ReplicaReadOnlyError: this relay follows its parent's policy.
            StateUnavailableError: it could not be saved (nothing changed).
        """
        self.check_writable()
        kept = {k: v for k, v in self.saved.items() if changes.get(k, v) is not None}
        changed = Settings.from_dict(
            {k: v for k, v in changes.items() if v is not None}, base=self.settings
        )
        forgotten = [k for k, v in changes.items() if v is None]
        unknown = [k for k in forgotten if k not in changed.to_dict()]
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown setting")
        as_json = changed.to_dict()
        saved = {**kept, **{k: as_json[k] for k, v in changes.items() if v is not None}}
        settings = Settings.from_dict(saved, base=self.defaults)
        await self._kv.set(_SAVED, saved)
        await self._kv.append_log({"at": now_rfc3339(), **audit})
        self.saved, self.settings = saved, settings
        self.version += 1
        self._changed()
        return settings

    def check_writable(self) -> None:
        """Raise if local changes are not allowed.

        Raises:
            ReplicaReadOnlyError: this relay follows its parent's policy.
        """
        if self.replica:
            raise ReplicaReadOnlyError(
                "this relay is a replica: change approvals and settings on its parent"
            )

    async def update(
        self,
        *,
        state: PolicyState | None = None,
        settings: Settings | None = None,
        audit: dict[str, Any] | None = None,
        local: bool = True,
    ) -> None:
        """Replace state and/or settings (all their keys saved), save them, record ``audit``.

        Raises:
            ReplicaReadOnlyError: a local change on a replica.
            StateUnavailableError: it could not be saved (nothing changed).
        """
        if local:
            self.check_writable()
        # Saved first, then in effect: a change that cannot be saved changes nothing.
        if state is not None:
            await self._kv.set(_STATE, state.to_dict())
        if settings is not None:  # every key of them: they override the configuration
            await self._kv.set(_SAVED, settings.to_dict())
        if audit is not None:
            await self._kv.append_log({"at": now_rfc3339(), **audit})
        if state is not None:
            self.state = state
        if settings is not None:
            self.settings = settings
            self.saved = settings.to_dict()
        self.version += 1
        self._changed()

    def _changed(self) -> None:
        for listener in list(self.listeners):
            listener()

    def group_settings(self, group: str) -> GroupSettings:
        """The agent settings of ``group``: the keys set for it over the defaults."""
        return GroupSettings.from_dict(self.groups.get(group, {}), self.group_defaults)

    def set_group_defaults(self, defaults: GroupSettings) -> bool:
        """Replace the defaults of every group's agent settings (the configuration was re-read).

        Returns:
            Whether they changed (the listeners are then called).
        """
        if defaults == self.group_defaults:
            return False
        self.group_defaults = defaults
        self._changed()
        return True

    async def set_group_settings(
        self,
        group: str,
        changes: Mapping[str, Any],
        *,
        audit: dict[str, Any] | None = None,
        local: bool = True,
        replace: bool = False,
    ) -> GroupSettings:
        """Set some agent settings of ``group`` (the others are kept), save them, record ``audit``.

        Args:
            group: the agent group.
            changes: keys of the JSON form of :class:`GroupSettings` and their values.
            audit: the audit entry.
            local: a change made here (refused on a replica), not copied from a parent.
            replace: ``changes`` are all the keys set for the group (a replica's copy).

        Returns:
            The group's settings now.

        Raises:
            ValueError: an unknown or malformed key (the message names it).
            ReplicaReadOnlyError: a local change on a replica.
        """
        if local:
            self.check_writable()
        merged = dict(changes) if replace else {**self.groups.get(group, {}), **changes}
        new = GroupSettings.from_dict(merged, self.group_defaults)  # checks every key
        groups = {**self.groups, group: merged}
        # Saved first, then in effect: a change that cannot be saved changes nothing.
        await self._kv.set(_GROUPS, dict(sorted(groups.items())))
        if audit is not None:
            await self._kv.append_log({"at": now_rfc3339(), **audit})
        self.groups = groups
        self.version += 1
        self._changed()
        return new

    async def record(self, audit: dict[str, Any]) -> None:
        """Append ``audit`` to the audit log (something done or refused, not a change).

        Raises:
            StateUnavailableError: it could not be saved.
        """
        await self._kv.append_log({"at": now_rfc3339(), **audit})

    async def audit_log(self, limit: int = 1000) -> list[Any]:
        """The newest audit entries, oldest first."""
        return list(await self._kv.log(limit))

    def export(self) -> dict[str, Any]:
        """What a replica copies: ``{"state": ..., "settings": ..., "groups": ...}``."""
        return {
            "state": self.state.to_dict(),
            "settings": self.settings.to_dict(),
            "groups": dict(sorted(self.groups.items())),
        }


def group_overrides(raw: Mapping[str, Any], base: GroupSettings) -> dict[str, dict[str, Any]]:
    """The agent settings set per group, from their JSON form (``export()["groups"]``).

    Raises:
        ValueError: a malformed group name or settings (the message names the field).
    """
    out = {}
    for group, value in raw.items():
        if not isinstance(group, str) or not isinstance(value, dict):
            raise ValueError(f"groups.{group}: expected an object of settings")
        GroupSettings.from_dict(value, base)
        out[group] = dict(value)
    return out

"""Replica mode: approvals, settings and group agent settings come from the parent relay.

A replica polls the parent's ``GET /v1/admin/policy`` with the token in
``policy.parent_token_file`` and applies it whole; local admin writes answer 409.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from relay.cache.upstream import Upstream
from relay.config import Config
from relay.core.policy import PolicyState, Settings
from relay.errors import RelayError
from relay.fleet.approvals import PolicyStore, group_overrides

logger = logging.getLogger(__name__)


POLICY_MAX_LENGTH = 4 * 1024 * 1024
"""The largest policy document a replica accepts from its parent."""


async def pull_parent_policy(config: Config, parent: Upstream, policy: PolicyStore) -> bool:
    """Copy the parent's approvals and settings (replica mode); True if they changed.

    The request goes through the relay's one upstream transport (``parent`` is
    :meth:`relay.cache.upstream.Upstream.with_base_url` of ``policy.parent_url``):
    its timeouts, retries, WAN throttle and byte counters apply.
    """
    token = ""
    if str(config.policy.parent_token_file) not in ("", "."):
        token = (await asyncio.to_thread(config.policy.parent_token_file.read_text)).strip()
    try:
        raw, _headers = await parent.fetch_bytes(
            "v1/admin/policy",
            max_length=POLICY_MAX_LENGTH,
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
        )
        data = json.loads(raw)
        new_state = PolicyState.from_dict(data["state"])
        new_settings = Settings.from_dict(data["settings"], base=policy.defaults)
        new_groups = group_overrides(data.get("groups", {}), policy.group_defaults)
    except (RelayError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        logger.warning("parent policy from %s unusable: %s", config.policy.parent_url, e)
        return False
    audit = {"action": "replica-update", "from": config.policy.parent_url}
    changed = new_state != policy.state or new_settings != policy.settings
    if changed:
        await policy.update(state=new_state, settings=new_settings, local=False, audit=audit)
    for group, overrides in sorted(new_groups.items()):
        if policy.groups.get(group) != overrides:
            await policy.set_group_settings(
                group, overrides, local=False, replace=True, audit={**audit, "group": group}
            )
            changed = True
    return changed


async def follow_parent(
    config: Config, parent: Upstream, policy: PolicyStore, on_change: Callable[[], None]
) -> None:
    """Pull the parent's policy every sync interval (between 5 and 60 seconds)."""
    while True:
        if await pull_parent_policy(config, parent, policy):
            on_change()
        await asyncio.sleep(max(5.0, min(config.sync.interval, 60.0)))

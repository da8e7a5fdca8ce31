"""Replica mode: approvals and settings come from the parent relay (WSUS's replica).

A replica polls the parent's ``GET /v1/admin/policy`` with the token in
``policy.parent_token_file`` and applies it whole; local admin writes answer 409.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp

from relay.config import Config
from relay.core.policy import PolicyState, Settings
from relay.fleet.approvals import PolicyStore

logger = logging.getLogger(__name__)


async def pull_parent_policy(
    config: Config, session: aiohttp.ClientSession, policy: PolicyStore
) -> bool:
    """Copy the parent's approvals and settings (replica mode); True if they changed."""
    token = ""
    if str(config.policy.parent_token_file) not in ("", "."):
        token = (await asyncio.to_thread(config.policy.parent_token_file.read_text)).strip()
    url = config.policy.parent_url.rstrip("/") + "/v1/admin/policy"
    try:
        async with session.get(
            url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:
            if resp.status != 200:
                logger.warning("parent policy: HTTP %d from %s", resp.status, url)
                return False
            data = await resp.json()
        new_state = PolicyState.from_dict(data["state"])
        new_settings = Settings.from_dict(data["settings"], base=policy.defaults)
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as e:
        logger.warning("parent policy from %s unusable: %s", url, e)
        return False
    if new_state == policy.state and new_settings == policy.settings:
        return False
    await policy.update(
        state=new_state,
        settings=new_settings,
        local=False,
        audit={"action": "replica-update", "from": config.policy.parent_url},
    )
    return True


async def follow_parent(
    config: Config,
    session: aiohttp.ClientSession,
    policy: PolicyStore,
    on_change: Callable[[], None],
) -> None:
    """Pull the parent's policy every sync interval (between 5 and 60 seconds)."""
    while True:
        if await pull_parent_policy(config, session, policy):
            on_change()
        await asyncio.sleep(max(5.0, min(config.sync.interval, 60.0)))

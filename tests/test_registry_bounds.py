"""The registry is bounded: a cap evicts the agent seen longest ago; idle agents expire."""

from __future__ import annotations

from collections import Counter

from relay.fleet.registry import Registry
from relay.storage.kv import KV


def _checkin(registry, agent_id, now):
    return registry.checkin(
        agent_id, group="default", address="10.0.0.1", installed=[], defer_days=0, now=now
    )


async def test_cap_evicts_the_least_recently_seen_and_forgets_it_on_disk(tmp_path):
    kv = KV(tmp_path / "state")
    registry = Registry(kv, max_agents=3, idle_expiry=0)
    evicted = Counter()
    registry.on_evicted = lambda reason: evicted.update([reason])
    for i, name in enumerate(["a", "b", "c"]):
        await registry.save(_checkin(registry, name, 100 + i))
    await registry.save(_checkin(registry, "a", 200))  # a is seen again: b is now the oldest
    await registry.save(_checkin(registry, "d", 201))
    assert sorted(r.agent_id for r in registry.all()) == ["a", "c", "d"]
    assert evicted == {"cap": 1}
    reloaded = Registry(kv, max_agents=3, idle_expiry=0)
    await reloaded.load()
    assert sorted(r.agent_id for r in reloaded.all()) == ["a", "c", "d"]
    kv.close()


async def test_idle_agents_expire(tmp_path):
    kv = KV(tmp_path / "state")
    registry = Registry(kv, max_agents=100, idle_expiry=60)
    evicted = Counter()
    registry.on_evicted = lambda reason: evicted.update([reason])
    await registry.save(_checkin(registry, "old", 0))
    await registry.save(_checkin(registry, "recent", 50))
    await registry.save(_checkin(registry, "new", 100))  # old was last seen 100 s ago
    assert sorted(r.agent_id for r in registry.all()) == ["new", "recent"]
    assert evicted == {"idle": 1}
    kv.close()

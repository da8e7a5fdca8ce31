"""The registry at scale: pages of agents by id, groups kept by count, one batched writer.

Through a real relay over HTTP where the behaviour is the API's (pages, durability
across a kill), on the registry and a real state store where it is the writer's
(coalescing counted in store writes, a store that refuses writes).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import re
import signal
import threading
import time
from collections import Counter

import aiohttp
import pytest

from relay.core.fleet import FleetState, LastOffer
from relay.core.policy import Action
from relay.core.protocol import Event, ReportEvent
from relay.errors import StateUnavailableError
from relay.fleet.registry import Registry
from relay.storage.kv import KV
from tests.support import released

TOKEN = "registry-t0ken-for-tests"
V1 = b"registry" * 500
SHA = hashlib.sha256(V1).hexdigest()


@pytest.fixture
def repo(repo):
    return released(repo, V1, "a.bin", product="app", version="1.0.0", kind="content")


def installed(version="1.0.0", sha=SHA):
    return [{"product": "app", "version": version, "sha256": sha}]


async def checkin(session, base, agent_id, group="default", version="1.0.0"):
    body = {"agent_id": agent_id, "group": group, "installed": installed(version)}
    async with session.post(f"{base}v1/checkin", json=body) as r:
        assert r.status == 200, await r.text()


async def get_agents(session, base, query=""):
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with session.get(f"{base}v1/admin/agents{query}", headers=headers) as r:
        return r.status, await r.json()


async def test_pages_walk_every_agent_once_in_order(serve_relay):
    relay = await serve_relay(**{"admin.token": TOKEN})
    ids = [f"host-{i:03d}" for i in range(37)]
    async with aiohttp.ClientSession() as s:
        await asyncio.gather(
            *(checkin(s, relay.url, a, "lab" if i % 3 else "default") for i, a in enumerate(ids))
        )
        seen, after, pages = [], None, 0
        while True:
            query = "?limit=5" + (f"&after={after}" if after else "")
            status, body = await get_agents(s, relay.url, query)
            assert status == 200, body
            assert len(body["agents"]) <= 5
            assert all(a["state"] for a in body["agents"])
            seen += [a["agent_id"] for a in body["agents"]]
            pages += 1
            after = body["next"]
            if after is None:
                break
            assert after == seen[-1]
        assert seen == sorted(ids) and pages == 8
        status, body = await get_agents(s, relay.url)  # the default limit holds them all
        assert [a["agent_id"] for a in body["agents"]] == sorted(ids) and body["next"] is None
        status, body = await get_agents(s, relay.url, "?limit=36")
        assert len(body["agents"]) == 36 and body["next"] == sorted(ids)[35]
        status, body = await get_agents(s, relay.url, f"?limit=36&after={body['next']}")
        assert [a["agent_id"] for a in body["agents"]] == [sorted(ids)[36]]
        assert body["next"] is None
        status, body = await get_agents(s, relay.url, "?after=host-010")
        assert body["agents"][0]["agent_id"] == "host-011"  # strictly after
        status, body = await get_agents(s, relay.url, "?after=zzz")
        assert (status, body) == (200, {"agents": [], "next": None})


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("?limit=0", "limit"),
        ("?limit=5001", "limit"),
        ("?limit=-1", "limit"),
        ("?limit=abc", "limit"),
        ("?limit=1.5", "limit"),
        ("?limit=%C2%B2", "limit"),
        ("?after=bad%20id!", "after"),
        ("?after=" + "a" * 129, "after"),
    ],
)
async def test_bad_page_parameters_are_400(serve_relay, query, field):
    relay = await serve_relay(**{"admin.token": TOKEN})
    async with aiohttp.ClientSession() as s:
        status, body = await get_agents(s, relay.url, query)
    assert status == 400 and body["error"].startswith(f"{field}:"), body


async def _seen(registry, agent_id, group, now, version="1.0.0"):
    record = registry.checkin(
        agent_id,
        group=group,
        address="10.0.0.1",
        installed=installed(version),
        defer_days=0,
        now=now,
    )
    await registry.save(record)


async def test_groups_follow_checkins_group_changes_evictions_and_reload(tmp_path):
    kv = KV(tmp_path / "state")
    registry = Registry(kv, max_agents=4, idle_expiry=100)
    evicted = Counter()
    registry.on_evicted = lambda reason: evicted.update([reason])
    t = time.time() - 200
    await _seen(registry, "a", "lab", t)
    await _seen(registry, "b", "lab", t + 1)
    await _seen(registry, "c", "default", t + 2)
    assert registry.group_counts() == {"lab": 2, "default": 1}
    await _seen(registry, "b", "pilot", t + 3)  # b moves to another group
    await _seen(registry, "d", "pilot", t + 4)
    assert registry.group_counts() == {"lab": 1, "default": 1, "pilot": 2}
    # e: the cap evicts a (seen longest ago), and c (t + 2) has been idle for 100 s.
    await _seen(registry, "e", "lab", t + 102.5)
    assert evicted == {"cap": 1, "idle": 1}
    assert registry.group_counts() == {"pilot": 2, "lab": 1}
    assert registry.groups() == {"pilot", "lab"}
    assert [r.agent_id for r in registry.page(None, 10)] == ["b", "d", "e"]
    await registry.close()

    again = Registry(kv, max_agents=3, idle_expiry=0)
    await again.load()
    assert again.group_counts() == {"pilot": 2, "lab": 1}
    assert [r.agent_id for r in again.page("b", 10)] == ["d", "e"]
    assert again.get("b").installed == installed()
    kv.close()


async def test_a_reload_past_the_cap_keeps_the_newest(tmp_path):
    kv = KV(tmp_path / "state")
    registry = Registry(kv, max_agents=10, idle_expiry=0)
    t = time.time()
    for i in range(6):
        await _seen(registry, f"a{i}", "g" if i % 2 else "h", t + i)
    await registry.close()
    evicted = Counter()
    smaller = Registry(kv, max_agents=4, idle_expiry=0)
    smaller.on_evicted = lambda reason: evicted.update([reason])
    await smaller.load()
    assert [r.agent_id for r in smaller.page(None, 10)] == ["a2", "a3", "a4", "a5"]
    assert smaller.group_counts() == {"g": 2, "h": 2} and evicted == {"cap": 2}
    await smaller.flush()  # the evicted records are deleted with the first batch
    assert sorted(k for k, _v in kv.items_sync("agent:")) == [f"agent:a{i}" for i in range(2, 6)]
    kv.close()


async def test_a_burst_of_checkins_is_durable_across_a_kill(relay_process):
    relay = await relay_process()
    ids = [f"burst-{i:02d}" for i in range(40)]
    async with aiohttp.ClientSession() as s:
        await asyncio.gather(
            *(checkin(s, relay.url, a, version=f"1.0.{i}") for i, a in enumerate(ids))
        )
    relay.proc.send_signal(signal.SIGKILL)  # no shutdown flush: only what was committed
    await relay.proc.wait()
    kv = KV(relay.data_dir / "state")
    registry = Registry(kv)
    await registry.load()
    assert [r.agent_id for r in registry.page(None, 100)] == ids
    assert all(registry.get(a).version_of("app") == f"1.0.{i}" for i, a in enumerate(ids))
    kv.close()


class CountingKV(KV):
    """A real store that counts its batches and the records they write, and can fail."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches = 0
        self.records = 0
        self.fail = False

    def write_many_sync(self, values, deletes):
        if self.fail == "bug":
            raise TypeError("not JSON serializable")
        if self.fail:
            raise StateUnavailableError("state database: cannot save: disk full")
        self.batches += 1
        self.records += len(values)
        super().write_many_sync(values, deletes)


async def test_last_seen_only_checkins_coalesce_into_one_write(tmp_path):
    kv = CountingKV(tmp_path / "state")
    registry = Registry(kv, flush_interval=3600)  # only a waiting save or flush writes
    t = time.time()
    await _seen(registry, "a1", "lab", t)  # new: committed before save returns
    assert (kv.batches, kv.records) == (1, 1)
    for i in range(50):  # only last_seen and the address move: nobody waits
        record = registry.checkin(
            "a1", group="lab", address=f"10.0.0.{i}", installed=installed(), defer_days=0, now=t + i
        )
        await registry.save(record)
    assert (kv.batches, kv.records) == (1, 1)
    await registry.flush()
    assert (kv.batches, kv.records) == (2, 2)
    stored = kv.get_sync("agent:a1")
    assert stored["last_seen"] == t + 49 and stored["address"] == "10.0.0.49"

    offer = LastOffer(Action.INSTALL, "1.1.0", "1" * 64, at="2026-03-01T12:00:00Z")
    registry.set_offers(record, {"app": offer}, {"app@1.1.0": t})  # a new offer: substance
    await registry.save(record)
    assert kv.batches == 3
    later = LastOffer(Action.INSTALL, "1.1.0", "1" * 64, at="2026-03-01T12:05:00Z")
    registry.set_offers(record, {"app": later}, {"app@1.1.0": t + 300})  # the same offer again
    await registry.save(record)
    assert kv.batches == 3
    assert record.first_offered == {"app@1.1.0": t}  # the first offer time stays
    await _seen(registry, "a1", "lab", t + 60, version="1.1.0")  # installed: substance
    assert kv.batches == 4
    await registry.close()
    assert kv.get_sync("agent:a1")["offered"]["app"]["at"] == "2026-03-01T12:05:00Z"
    kv.close()


async def test_a_store_that_refuses_writes_fails_every_save_until_it_recovers(tmp_path):
    kv = CountingKV(tmp_path / "state")
    registry = Registry(kv, flush_interval=3600)
    t = time.time()
    await _seen(registry, "a1", "lab", t)
    kv.fail = True
    with pytest.raises(StateUnavailableError, match="disk full"):
        await _seen(registry, "a2", "lab", t + 1)
    with pytest.raises(StateUnavailableError, match="disk full"):
        await _seen(registry, "a1", "lab", t + 2)  # no substance, but the store fails: it waits
    kv.fail = "bug"  # an unexpected error: the same answer, and the writer goes on
    with pytest.raises(StateUnavailableError, match="not JSON serializable"):
        await _seen(registry, "a3", "lab", t + 3)
    kv.fail = False
    await _seen(registry, "a1", "lab", t + 4)
    assert sorted(k for k, _v in kv.items_sync("agent:")) == ["agent:a1", "agent:a2", "agent:a3"]
    await registry.close()
    kv.close()

    damaged = KV(tmp_path / "other", damaged="damaged for the test")
    registry = Registry(damaged)
    for now in (t, t + 1):  # a new agent, then the same again: both refused, as before
        with pytest.raises(StateUnavailableError, match="relay state check --repair"):
            await _seen(registry, "a1", "lab", now)
    await registry.close()


async def test_the_status_page_lists_agents_a_page_at_a_time(tmp_path, aiohttp_server, monkeypatch):
    from relay.server import ui
    from tests.fleet_support import TOKEN as FLEET_TOKEN
    from tests.fleet_support import populate, start_fleet

    fleet = await start_fleet(tmp_path, aiohttp_server)
    await populate(fleet)  # broken, lazy, new, ok: one row each
    monkeypatch.setattr(ui, "MAX_ROWS", 2)
    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as s:
        await s.post(fleet.relay.make_url("/ui/login"), data={"token": FLEET_TOKEN})

        async def agents_on(path):
            async with s.get(fleet.relay.make_url(path)) as r:
                text = await r.text()
                return r.status, re.findall(r'href="/ui/agents/(\w+)"', text), text

        status, shown, text = await agents_on("/ui/")
        assert status == 200 and shown == ["broken", "lazy"]
        assert 'href="/ui/?after=lazy#agents"' in text
        status, shown, text = await agents_on("/ui/?after=lazy")
        assert shown == ["new", "ok"] and "after=" not in text
        status, shown, text = await agents_on("/ui/?group=lab")
        assert shown == ["lazy", "new"]
        status, _, text = await agents_on("/ui/?after=bad%20id")
        assert status == 400 and "after:" in text


# -- what the garbage collector sees, and records as views ---------------------------


async def test_the_collector_does_not_track_agents_once_it_has_seen_them(tmp_path):
    """Every agent is held as values the cyclic collector stops tracking after one pass.

    Its full passes then cost nothing per agent; a value that holds a list, a dict or
    an object (tracked forever) would make each pass walk every agent again.
    """
    kv = KV(tmp_path / "state")
    registry = Registry(kv, max_agents=1000, idle_expiry=0)
    now = time.time()
    for i in range(50):
        record = registry.checkin(
            f"a{i}",
            group="lab" if i % 2 else "default",
            address="10.0.0.1",
            installed=installed(),
            defer_days=7 * (i % 2),
            now=now,
        )
        registry.set_offers(
            record,
            {"app": LastOffer(Action.INSTALL, "1.1.0", "1" * 64, at="2026-03-01T12:00:00Z")},
            {"app@1.1.0": now},
        )
        registry.report(
            f"a{i}",
            [ReportEvent("app", "1.0.0", "1.1.0", Event.FAILED, reason="install_failed")],
            address="10.0.0.1",
        )
        await registry.save(record)
    summary = await registry.summary()  # keeps every agent's report rows
    assert summary.agents == 50 and summary.states[FleetState.FAILED] == 50
    # A pass lets go of one level of new tuples (an agent's offers nest three deep).
    for _ in range(4):
        gc.collect()
    values = list(registry._agents.values())
    kept = list(registry._kept.values())
    assert len(values) == 50 and len(kept) == 50
    assert not [v for v in values if gc.is_tracked(v)]
    assert not [k for k in kept if gc.is_tracked(k)]
    await registry.close()
    kv.close()


async def test_records_are_views_of_the_newest_values(tmp_path):
    kv = KV(tmp_path / "state")
    registry = Registry(kv, max_agents=2, idle_expiry=0)
    t = time.time()
    await _seen(registry, "a", "lab", t)
    first, second = registry.get("a"), registry.get("a")
    first.defer_days = 7
    second.offered = {"app": LastOffer(Action.INSTALL, "1.1.0", "1" * 64)}
    # Neither change is lost: each one replaced the newest values.
    assert registry.get("a").defer_days == 7 and first.offered == second.offered
    assert first.offer_of("app").version == "1.1.0"
    before = first.rev
    registry.checkin("a", group="pilot", address="10.0.0.2", installed=[], defer_days=7, now=t)
    assert first.group == "pilot" and first.address == "10.0.0.2" and first.rev > before
    assert registry.group_counts() == {"pilot": 1}

    # Evicted: a record keeps its last values and no longer writes into the registry.
    await _seen(registry, "b", "lab", t + 1)
    await _seen(registry, "c", "lab", t + 2)
    assert registry.get("a") is None
    first.defer_days = 14
    assert first.defer_days == 14 and registry.get("a") is None and len(registry) == 2
    await registry.close()
    kv.close()


async def test_the_rows_kept_for_an_agent_are_not_those_of_an_earlier_one_of_its_id(tmp_path):
    """Revisions are unique across records: an agent dropped and seen again is counted anew."""
    kv = KV(tmp_path / "state")
    registry = Registry(kv, max_agents=1, idle_expiry=0)
    t = time.time()
    await _seen(registry, "a", "lab", t)
    registry.report(
        "a", [ReportEvent("app", "1.0.0", "1.1.0", Event.FAILED)], address="10.0.0.1", now=t
    )
    assert registry.summary_sync().states[FleetState.FAILED] == 1
    await _seen(registry, "b", "lab", t + 1)  # a is evicted
    await _seen(registry, "a", "lab", t + 2)  # and comes back, without its failure
    rows = registry.rows()
    assert [(r.agent_id, r.state) for r in rows] == [("a", FleetState.UNKNOWN)]
    await registry.close()
    kv.close()


# -- views of an evicted agent, and the batch being written (review of 2efd134) ------


async def test_a_view_of_an_evicted_agent_does_not_write_into_the_agent_seen_again(tmp_path):
    """An agent evicted then seen again is a new record: an old view reads and writes its own."""
    kv = KV(tmp_path / "state")
    registry = Registry(kv, max_agents=1, idle_expiry=0)
    t = time.time()
    await _seen(registry, "a", "lab", t)
    old = registry.get("a")
    await _seen(registry, "b", "lab", t + 1)  # a is evicted
    await _seen(registry, "a", "pilot", t + 2)  # and seen again (b is evicted)
    old.add_event(ReportEvent("app", "1.0.0", "1.1.0", Event.FAILED))
    old.defer_days = 30
    again = registry.get("a")
    assert (again.failures, again.defer_days, again.events) == (0, 0, [])
    assert again.first_seen == t + 2 and again.group == "pilot"
    assert old.group == "lab" and old.failures == 1  # the old view keeps its own values
    assert [r.state for r in registry.rows()] == [FleetState.UNKNOWN]
    await registry.close()
    assert kv.get_sync("agent:a")["failures"] == 0
    kv.close()


async def test_saving_a_view_of_an_evicted_agent_does_not_bring_it_back(tmp_path):
    kv = KV(tmp_path / "state")
    registry = Registry(kv, max_agents=1, idle_expiry=0)
    evicted = Counter()
    registry.on_evicted = lambda reason: evicted.update([reason])
    t = time.time()
    await _seen(registry, "a", "lab", t)
    old = registry.get("a")
    await _seen(registry, "b", "pilot", t + 1)  # a is evicted (its stored record deleted)
    offer = LastOffer(Action.INSTALL, "1.1.0", "1" * 64, at="2026-03-01T12:00:00Z")
    registry.set_offers(old, {"app": offer}, {"app@1.1.0": t})
    await registry.save(old)
    # b, seen last, is still there; a is not back (nor counted, listed or stored).
    assert [r.agent_id for r in registry.page(None, 10)] == ["b"]
    assert registry.get("a") is None and registry.group_counts() == {"pilot": 1}
    assert evicted == {"cap": 1}
    assert not registry._dirty - {"b"} and not registry._urgent
    await registry.close()
    assert sorted(k for k, _v in kv.items_sync("agent:")) == ["agent:b"]
    kv.close()


class BlockingKV(KV):
    """A real store whose writes can be held (a slow disk), to act while a batch is written."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hold = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def write_many_sync(self, values, deletes):
        if self.hold:
            self.entered.set()
            self.release.wait(10)
        super().write_many_sync(values, deletes)


async def test_close_waits_for_the_batch_being_written(tmp_path):
    """flush/close: the batch already being written is pending too (the store closes after)."""
    kv = BlockingKV(tmp_path / "state")
    registry = Registry(kv, flush_interval=0.01, idle_expiry=0)
    t = time.time()
    await _seen(registry, "a", "lab", t)
    kv.hold = True
    await _seen(registry, "a", "lab", t + 5)  # only last_seen: written with the next batch
    assert await asyncio.to_thread(kv.entered.wait, 10)
    closing = asyncio.create_task(registry.close())
    await asyncio.sleep(0.2)
    done_early = closing.done()
    kv.release.set()
    await closing
    assert not done_early, "close() returned while the batch was still being written"
    assert kv.get_sync("agent:a")["last_seen"] == t + 5
    kv.close()


async def test_a_change_made_while_a_batch_is_written_goes_into_the_next(tmp_path):
    kv = BlockingKV(tmp_path / "state")
    registry = Registry(kv, flush_interval=3600, idle_expiry=0)
    t = time.time()
    await _seen(registry, "a", "lab", t)
    kv.hold = True
    first = asyncio.create_task(_seen(registry, "a", "lab", t + 1, version="1.1.0"))
    assert await asyncio.to_thread(kv.entered.wait, 10)
    kv.hold = False
    second = asyncio.create_task(_seen(registry, "a", "lab", t + 2, version="1.2.0"))
    await asyncio.sleep(0.05)
    assert not second.done()  # waits for the next batch, not the one being written
    kv.release.set()
    await asyncio.gather(first, second)
    stored = kv.get_sync("agent:a")
    assert stored["installed"][0]["version"] == "1.2.0" and stored["last_seen"] == t + 2
    await registry.close()
    kv.close()

"""The light agent population of ``tree_bench.py``: COUNT agents in one process.

Each agent speaks the relay's agent protocol (docs/PROTOCOL.md) over one aiohttp session
shared by the process: it checks in (``POST /v1/checkin`` with its ``Relay-Agent-Id``, group
and installed version), holds ``GET /v1/events?since=<generation>`` with the token of its
check-in, and when an answer comes waits its ``delay_ms`` and checks in again; offered a
version, it downloads the blob (``/targets/<dir>/<sha256>.<name>`` of the offer's target),
checks its sha256 and length against the offer, reports ``installed`` (``POST /v1/reports``)
and checks in again. A ``503`` is waited out for its ``Retry-After`` (counted as ``busy``);
anything else unexpected is counted as an error, by kind, and the step is tried again.

Light: no python-tuf per agent (the metadata is not fetched or verified; the sha256 of the
offer is). The full TUF client is what ``tests/`` and ``relay demo`` use.

The process runs at a lower priority (``--nice``): on a machine shared with the relays,
the agents (on their own machines in a real fleet) should not take the relays' CPU.
The process prints ``ready`` once every agent has checked in and sent its first events
request, then ``done`` once every agent installed ``--want`` and checked in after it (or at
``--timeout`` seconds after ``ready``), and writes its figures as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from relay.core.protocol import AGENT_ID_HEADER, AGENT_TOKEN_HEADER, DEFAULT_GROUP  # noqa: E402

STARTING = 32  # agents of one process in their first check-in at once (a ramp, not a SYN flood)
RETRY_S = 1.0  # wait before trying a step again after an error
LAG_TICK = 0.1  # seconds between the loop-lag ticks
LAG_REPORTED = 0.25  # seconds: later wake-ups are recorded
CALL_TIMEOUT = aiohttp.ClientTimeout(total=120, sock_connect=30)


def raise_nofile() -> None:
    """Raise the soft open-file limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Population:
    """What the agents of this process share: the session, the plan and the counters."""

    session: aiohttp.ClientSession
    product: str
    want: str
    hold_timeout: aiohttp.ClientTimeout
    started: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(STARTING))
    errors: Counter[str] = field(default_factory=Counter)
    busy: Counter[str] = field(default_factory=Counter)
    lags: list[tuple[float, float]] = field(default_factory=list)  # (time, seconds late)
    # seconds from the agent's previous answer to each connection error
    error_gaps: list[float] = field(default_factory=list)
    checkins: list[tuple[float, float, int]] = field(default_factory=list)  # start, s, branch
    events_200: int = 0
    events_204: int = 0
    ready: int = 0
    finished: int = 0
    all_ready: asyncio.Event = field(default_factory=asyncio.Event)
    all_finished: asyncio.Event = field(default_factory=asyncio.Event)
    count: int = 0


class Agent:
    """One light agent bound to one relay."""

    def __init__(
        self, pop: Population, agent_id: str, branch: int, base: str, version: str, sha: str
    ):
        self.pop = pop
        self.id = agent_id
        self.branch = branch
        self.base = base.rstrip("/")
        self.installed = {"product": pop.product, "version": version, "sha256": sha}
        self.token = ""
        self.generation = ""
        self.installed_at: float | None = None
        self.answered = time.monotonic()  # when the agent's previous answer ended
        self.bytes = 0

    def _headers(self) -> dict[str, str]:
        headers = {AGENT_ID_HEADER: self.id}
        if self.token:
            headers[AGENT_TOKEN_HEADER] = self.token
        return headers

    async def _call(
        self,
        what: str,
        method: str,
        path: str,
        ok: tuple[int, ...],
        body: dict[str, Any] | None = None,
        timeout: aiohttp.ClientTimeout = CALL_TIMEOUT,
    ) -> tuple[int, bytes]:
        """One request, tried until its status is in ``ok`` (503: wait its Retry-After)."""
        while True:
            try:
                async with self.pop.session.request(
                    method, self.base + path, json=body, headers=self._headers(), timeout=timeout
                ) as resp:
                    data = await resp.read()
                    self.answered = time.monotonic()
                    if resp.status in ok:
                        return resp.status, data
                    if resp.status == 503:
                        self.pop.busy[what] += 1
                        await asyncio.sleep(float(resp.headers.get("Retry-After", "1")))
                        continue
                    self.pop.errors[f"{what}: {resp.status}"] += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.pop.errors[f"{what}: {type(exc).__name__}"] += 1
                self.pop.error_gaps.append(time.monotonic() - self.answered)
            await asyncio.sleep(RETRY_S)

    async def checkin(self) -> list[dict[str, Any]]:
        body = {
            "agent_id": self.id,
            "group": DEFAULT_GROUP,
            "installed": [self.installed],
            "accept_delta": [],
        }
        start = time.time()
        t0 = time.monotonic()
        _, data = await self._call("checkin", "POST", "/v1/checkin", (200,), body)
        self.pop.checkins.append((start, time.monotonic() - t0, self.branch))
        answer = json.loads(data)
        self.token = answer["agent_token"]
        self.generation = answer["generation"]
        return answer["offers"]

    async def install(self, offer: dict[str, Any]) -> None:
        """Download the offered blob until its sha256 and length match, then report it."""
        directory, _, name = offer["target"].rpartition("/")
        path = f"/targets/{directory}/{offer['sha256']}.{name}"
        while True:
            _, blob = await self._call("blob", "GET", path, (200,))
            if hashlib.sha256(blob).hexdigest() == offer["sha256"] and len(blob) == offer["length"]:
                break
            self.pop.errors["blob: sha256 or length mismatch"] += 1
            await asyncio.sleep(RETRY_S)
        self.bytes += len(blob)
        event = {
            "product": offer["product"],
            "from_version": self.installed["version"],
            "to_version": offer["version"],
            "event": "installed",
            "via": "full",
            "bytes": len(blob),
        }
        await self._call(
            "report", "POST", "/v1/reports", (202,), {"agent_id": self.id, "events": [event]}
        )
        self.installed = {
            "product": offer["product"],
            "version": offer["version"],
            "sha256": offer["sha256"],
        }
        if offer["version"] == self.pop.want:
            self.installed_at = time.time()

    async def update(self) -> None:
        """Check in, install what is offered, and check in again after each install."""
        offers = await self.checkin()
        while True:
            todo = [
                o
                for o in offers
                if o["action"] == "install" and o["sha256"] != self.installed["sha256"]
            ]
            if not todo:
                return
            await self.install(todo[0])
            offers = await self.checkin()
            if self.installed_at is not None and self.installed["version"] == self.pop.want:
                self.pop.finished += 1
                if self.pop.finished == self.pop.count:
                    self.pop.all_finished.set()

    async def run(self) -> None:
        async with self.pop.started:
            await self.update()
        self.pop.ready += 1
        first = True
        while True:
            pending = asyncio.ensure_future(
                self._call(
                    "events",
                    "GET",
                    f"/v1/events?since={self.generation}",
                    (200, 204),
                    timeout=self.pop.hold_timeout,
                )
            )
            if first:  # the request is on its way: this agent is settled
                await asyncio.sleep(0)
                if self.pop.ready == self.pop.count:
                    self.pop.all_ready.set()
                first = False
            status, data = await pending
            if status == 204:
                self.pop.events_204 += 1
                continue
            self.pop.events_200 += 1
            await asyncio.sleep(json.loads(data)["delay_ms"] / 1000)
            await self.update()


async def watch_loop(pop: Population) -> None:
    """Record when this process's event loop wakes up late (the agents' own lag)."""
    while True:
        before = time.monotonic()
        await asyncio.sleep(LAG_TICK)
        late = time.monotonic() - before - LAG_TICK
        if late > LAG_REPORTED:
            pop.lags.append((time.time(), late))


async def population(args: argparse.Namespace) -> dict[str, Any]:
    branches = args.branches.split(",")
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=15)
    async with aiohttp.ClientSession(connector=connector) as session:
        pop = Population(
            session=session,
            product=args.product,
            want=args.want,
            hold_timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=30, sock_read=args.hold + 30
            ),
            count=args.count,
        )
        agents = [
            Agent(
                pop,
                f"tree-{i}",
                i % len(branches),
                branches[i % len(branches)],
                args.version,
                args.sha256,
            )
            for i in range(args.first, args.first + args.count)
        ]
        tasks = [asyncio.create_task(a.run()) for a in agents]
        tasks.append(asyncio.create_task(watch_loop(pop)))
        await asyncio.wait_for(pop.all_ready.wait(), args.timeout)
        ready_at = time.time()
        print("ready", flush=True)
        timed_out = False
        try:
            await asyncio.wait_for(pop.all_finished.wait(), args.timeout)
        except TimeoutError:
            timed_out = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "agents": args.count,
        "ready_at": ready_at,
        "timed_out": timed_out,
        "finished": pop.finished,
        "errors": dict(pop.errors),
        "busy_503": dict(pop.busy),
        "cpu_s": time.process_time(),
        "loop_lags": pop.lags,
        "error_gaps": pop.error_gaps,
        "events_200": pop.events_200,
        "events_204": pop.events_204,
        "checkins": pop.checkins,
        "installed": [[a.branch, a.installed_at] for a in agents],
        "bytes": sum(a.bytes for a in agents),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--branches", required=True, help="relay base URLs, comma-separated")
    parser.add_argument("--first", type=int, default=0, help="index of the first agent")
    parser.add_argument("--count", type=int, required=True, help="agents in this process")
    parser.add_argument("--product", required=True)
    parser.add_argument("--version", required=True, help="the version installed at start")
    parser.add_argument("--sha256", required=True, help="its sha256")
    parser.add_argument("--want", required=True, help="the version every agent must install")
    parser.add_argument("--hold", type=float, default=55, help="the relays' events.hold, s")
    parser.add_argument("--timeout", type=float, default=600, help="for each phase, s")
    parser.add_argument(
        "--nice", type=int, default=10, help="added niceness: the relays first (10)"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    raise_nofile()
    os.nice(args.nice)
    result = asyncio.run(population(args))
    args.out.write_text(json.dumps(result))
    print("done", flush=True)


if __name__ == "__main__":
    main()

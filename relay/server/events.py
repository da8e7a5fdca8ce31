"""``GET /v1/events``: the long poll that tells agents and child relays to come now.

Rules (docs/PROTOCOL.md, "Events"):

* The generation of an agent's group (:class:`relay.core.events.Generation`) changes
  with a new verified timestamp, with the policy that concerns the group and with
  the group's agent settings. A ``since`` that differs is answered at once; else
  the request is held for up to ``events.hold`` seconds and answered as soon as the
  generation changes, ``204`` at the end of the hold.
* Idle connections are cheap: a waiter is the handler aiohttp already runs, blocked
  on one :class:`asyncio.Event` shared by every waiter of its group (one per
  change, a "wave"), with one timer handle for its hold. No task per waiter.
* The agents of one wave get delays spread evenly over ``events.splay``, in the
  order they wake (:func:`relay.core.events.splay_delay_ms`).
* A child relay holds the same long poll on its parent through its upstream
  (:func:`follow_upstream`, with ``client=relay``) and syncs as soon as it answers;
  when the parent offers no events, or they fail, the sync loop's own interval is the
  fallback. Child relays are not splayed (``delay_ms`` 0) and do not count in their
  wave's spread: each spreads its own agents, so a tree adds one splay, not one per
  level.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from urllib.parse import urlencode

from aiohttp import web

from relay.cache.mirror import Mirror
from relay.cache.upstream import Upstream
from relay.core.events import Generation, Reason, digest, policy_digest, splay_delay_ms
from relay.core.protocol import AGENT_ID_HEADER, DEFAULT_GROUP
from relay.core.verify import VerifiedMetadata
from relay.errors import LengthMismatchError, TransportError, UpstreamHTTPError
from relay.fleet.approvals import PolicyStore
from relay.fleet.registry import Registry
from relay.server.http import bad_request, verified_agent
from relay.server.state import STATE

logger = logging.getLogger(__name__)

MAX_SINCE = 64  # characters of a ``since`` parameter
MAX_ANSWER = 4096  # bytes of an upstream's event answer
NO_EVENTS_PAUSE = 3600.0  # seconds before asking again an upstream without events
FIRST_RETRY = 1.0  # seconds before the first retry after a failure; doubles


@dataclass(slots=True)
class _Wave:
    """The waiters of one group between two changes."""

    event: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0  # waiters blocked on ``event`` now
    relays: int = 0  # of them, child relays (never splayed)
    count: int = 0  # waiters when the change happened (the splay's divisor)
    taken: int = 0  # waiters woken so far (the next one's place)
    closing: bool = False  # woken because the relay stops: answer 204


@dataclass(slots=True)
class _Channel:
    generation: Generation
    wave: _Wave = field(default_factory=_Wave)


@dataclass(frozen=True, slots=True)
class Answer:
    """What ``GET /v1/events`` answers with ``200``."""

    generation: Generation
    reasons: tuple[Reason, ...]
    delay_ms: int

    def to_dict(self) -> dict[str, object]:
        """The JSON body."""
        return {
            "generation": str(self.generation),
            "reasons": [str(r) for r in self.reasons],
            "delay_ms": self.delay_ms,
        }


class EventHub:
    """The generation of each agent group, and the agents waiting for it to change.

    Args:
        policy: approvals and settings (a listener is added: every change is seen).
        hold: seconds a request is held without a change.
        splay: seconds the agents of one change are spread over.
    """

    def __init__(self, policy: PolicyStore, *, hold: float, splay: float) -> None:
        self._policy = policy
        self.hold = hold
        self.splay = splay
        self.content = 0
        self._channels: dict[str, _Channel] = {}
        self._closed = False
        policy.listeners.append(self.refresh)

    @property
    def waiting(self) -> int:
        """Requests held now."""
        return sum(c.wave.waiting for c in self._channels.values())

    def _generation(self, group: str) -> Generation:
        policy = self._policy
        return Generation(
            self.content,
            policy_digest(policy.state, policy.settings, group),
            digest(policy.group_settings(group).to_dict()),
        )

    def _channel(self, group: str) -> _Channel:
        channel = self._channels.get(group)
        if channel is None:
            channel = self._channels[group] = _Channel(self._generation(group))
        return channel

    def generation(self, group: str) -> Generation:
        """The current generation of ``group``."""
        return self._channel(group).generation

    def content_changed(self, version: int) -> None:
        """A new timestamp (``version``) was verified: wake every group."""
        self.content = version
        self.refresh()

    def refresh(self) -> None:
        """Recompute each group's generation; wake the groups whose generation changed."""
        for group, channel in self._channels.items():
            new = self._generation(group)
            if new != channel.generation:
                channel.generation = new
                self._wake(channel)

    @staticmethod
    def _wake(channel: _Channel, *, closing: bool = False) -> None:
        wave = channel.wave
        wave.count = wave.waiting - wave.relays
        wave.closing = closing
        channel.wave = _Wave()
        wave.event.set()

    def close(self) -> None:
        """Answer every held request now (``204``); new ones are answered at once."""
        self._closed = True
        for channel in self._channels.values():
            self._wake(channel, closing=True)

    async def wait(self, group: str, since: str, *, relay: bool = False) -> Answer | None:
        """Wait until the generation of ``group`` differs from ``since``, for at most the hold.

        Args:
            group: the waiter's agent group.
            since: the generation it knows.
            relay: the waiter is a child relay: answered without delay, and not
                counted in the spread of the agents it wakes with.

        Returns:
            The answer, or ``None`` at the end of the hold (or when closing).
        """
        channel = self._channel(group)
        reasons = channel.generation.reasons_since(since)
        if reasons:
            return Answer(channel.generation, reasons, 0)
        if self._closed:
            return None
        deadline = asyncio.get_running_loop().time() + self.hold
        index, count = 0, 1
        while not reasons:
            wave = channel.wave
            wave.waiting += 1
            wave.relays += relay
            try:
                async with asyncio.timeout_at(deadline):
                    await wave.event.wait()
            except TimeoutError:
                return None
            finally:
                wave.waiting -= 1
                wave.relays -= relay
            if wave.closing:
                return None
            if not relay:
                index, count = wave.taken, wave.count
                wave.taken += 1
            reasons = channel.generation.reasons_since(since)
        return Answer(channel.generation, reasons, splay_delay_ms(index, count, self.splay))


EVENTS = web.AppKey("events", EventHub)


async def answer_held(app: web.Application) -> None:
    """``on_shutdown``: answer every held request (``204``) so draining does not wait for them."""
    hub = app.get(EVENTS)
    if hub is not None:
        hub.close()


def group_of(registry: Registry, agent_id: str) -> str:
    """The group ``agent_id`` named in its last check-in (the default group if none)."""
    record = registry.get(agent_id)
    return record.group if record is not None else DEFAULT_GROUP


async def events(request: web.Request) -> web.StreamResponse:
    """``GET /v1/events?since=<generation>[&client=relay]``: answer when the group changes."""
    query = request.query
    since = query.get("since", "")
    if len(since) > MAX_SINCE:
        return bad_request(f"since: longer than {MAX_SINCE} characters")
    client = query.get("client", "agent")
    if client not in ("agent", "relay"):
        return bad_request('client: "agent" or "relay"')
    # Read-only: an agent without a token may still name itself to learn its group.
    claimed = verified_agent(request) or request.headers.get(AGENT_ID_HEADER) or ""
    group = group_of(request.app[STATE].registry, claimed)
    answer = await request.app[EVENTS].wait(group, since, relay=client == "relay")
    if answer is None:
        return web.Response(status=204)
    return web.Response(
        body=json.dumps(answer.to_dict()).encode(),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def follow_mirror(hub: EventHub, mirror: Mirror) -> None:
    """Make ``hub`` follow the timestamp versions ``mirror`` verifies."""
    if mirror.current is not None:
        hub.content = mirror.current.timestamp_version

    async def on_sync(verified: VerifiedMetadata) -> None:
        hub.content_changed(verified.timestamp_version)

    mirror.listeners.append(on_sync)


async def follow_upstream(
    upstream: Upstream, mirror: Mirror, *, hold: float, fallback: float
) -> None:
    """Hold ``GET /v1/events`` on the upstream and sync as soon as it answers.

    A child relay's events come from its parent: each answer (after the
    ``delay_ms`` it names) triggers a sync, whose new generation wakes this relay's
    own agents. An upstream without events (a static origin: ``404``) is asked again
    after :data:`NO_EVENTS_PAUSE`; after a failure the next try waits from
    :data:`FIRST_RETRY` seconds, doubling up to ``fallback`` (the sync interval,
    which keeps syncing meanwhile).

    Args:
        upstream: the relay's upstreams (the first healthy one is asked).
        mirror: the mirror to sync.
        hold: the longest an upstream holds the request, in seconds.
        fallback: the longest pause after a failure, in seconds.
    """
    since = ""
    retry = FIRST_RETRY
    while True:
        path = f"v1/events?{urlencode({'since': since, 'client': 'relay'})}"
        try:
            body = await upstream.long_poll(path, hold=hold, max_length=MAX_ANSWER)
            answer = json.loads(body) if body is not None else None
            if answer is not None:
                generation, delay = str(answer["generation"]), int(answer["delay_ms"])
        except UpstreamHTTPError as e:
            pause = NO_EVENTS_PAUSE if e.status_code in (404, 405) else retry
            logger.info("upstream events: %s; next try in %.0f s", e, pause)
            await asyncio.sleep(pause)
            retry = min(retry * 2, fallback)
            continue
        except (TransportError, LengthMismatchError, ValueError, KeyError, TypeError) as e:
            logger.info("upstream events failed (%s); next try in %.0f s", e, retry)
            await asyncio.sleep(retry)
            retry = min(retry * 2, fallback)
            continue
        retry = FIRST_RETRY
        if answer is None:
            continue  # the hold ended: nothing new
        since = generation
        await asyncio.sleep(max(delay, 0) / 1000)
        mirror.trigger_sync()

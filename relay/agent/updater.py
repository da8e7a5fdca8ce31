"""The reference agent, and a library vendors can embed.

One run (:meth:`Agent.run_once`):

1. Check in with the first relay that answers (``POST /v1/checkin``), in order.
2. Refresh TUF metadata through that relay with python-tuf's ``Updater``; its
   metadata directory persists across runs (rollback protection survives
   restarts); every request carries ``Relay-Agent-Id`` and, once a check-in has
   answered one, ``Relay-Agent-Token`` (our own fetcher). A relay that answers
   ``503`` with ``Retry-After`` is asked again after that wait, as long as the
   waits fit in ``busy_wait``; only then does the request fail.
3. For each offer to install or roll back: download the delta when one is offered
   and apply it to the verified installed file (declared size checked first, the
   result's sha256 after); otherwise, or if the patch is refused, the full target
   through ``Updater.download_target`` (verified by python-tuf).
4. Install atomically (temp file, ``os.replace``), run the optional install command
   with a timeout (on failure or timeout the previous version is put back), then
   the post-install actions named in the target's ``custom.actions``, once.
5. Report each outcome (``POST /v1/reports``); reports that cannot be sent are
   kept and sent with the next run.

Between runs (:meth:`Agent.wait`) the agent holds ``GET /v1/events`` on the relay
it checked in with, so it comes back within seconds of new content or a changed
policy (after the ``delay_ms`` the relay gives it), and falls back to its poll
interval when events fail. The group settings of each check-in answer apply at
once: poll interval, events on or off, the install schedule (a slot drawn at random
in the next window, :mod:`relay.core.schedule`), new content at once, the actions
run after each install, and configuration at most once a day. An offer to
``uninstall`` (a declined version with nothing to move to) runs the configured
uninstall command, or removes the installed file when none is set.

Relays-only (docs/PROTOCOL.md): until its first successful check-in the agent follows its
own ``relays_only`` setting, then the relay's persisted answer. With relays-only and
every relay down, the origin receives no request at all.

The agent is synchronous (python-tuf's ``Updater`` is): run it in a thread from
asyncio (:func:`run_once_async`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import functools
import json
import logging
import os
import random
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import urllib3
from tuf.api import exceptions as tuf_exceptions
from tuf.api.metadata import Metadata, Targets
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from relay.config import AgentSettings
from relay.core.model import Channel, Kind, Target
from relay.core.protocol import (
    AGENT_ID_HEADER,
    AGENT_TOKEN_HEADER,
    DeltaFormat,
    Event,
    InstalledItem,
    ReportEvent,
    Via,
)
from relay.core.schedule import GroupSettings, Slot, install_gate, plan_slot
from relay.deltas.apply import apply_patch_file
from relay.errors import AgentError, InstallError, PatchRejectedError
from relay.storage.fsio import hash_file

logger = logging.getLogger(__name__)

STATE_FILE = "agent.json"
DEFAULT_POLL = 3600.0  # seconds between runs when the relay names no poll_seconds
_MESSAGE_MAX = 2000  # characters of a report's message (the relay refuses longer ones)
_CHUNK = 64 * 1024
_IDENTITY = {"Accept-Encoding": "identity"}  # blobs are hashed as sent: no content coding
EVENTS_READ_TIMEOUT = 150.0  # seconds: longer than any relay holds GET /v1/events
EVENTS_RETRY = 5.0  # seconds before retrying events after a failure; doubles
_MISSING_ROUTES = (404, 405)  # a relay (or origin) without GET /v1/events


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the agent needs (units in comments).

    Every key of the ``[agent]`` configuration section is a field here (``id`` is
    ``agent_id``): build it from the settings with :meth:`from_settings`.
    """

    agent_id: str
    trusted_root: Path
    state_dir: Path
    install_dir: Path
    relays: tuple[str, ...] = ()
    origin: str = ""
    group: str = "default"
    relays_only: bool = False
    # Kinds installed from the origin by an agent that never reached a relay (the
    # relay's own "install undefined" defaults: content flows, software waits).
    install_undefined: tuple[str, ...] = ("content",)
    install_command: str = ""  # run with RELAY_PRODUCT, RELAY_VERSION, RELAY_FILE set
    uninstall_command: str = ""  # the same variables; "" = delete the installed file
    install_timeout: float = 300.0  # seconds
    defer_days: int = 0  # 0, 1, 3 or 7
    accept_delta: tuple[str, ...] = ("zstd", "bsdiff4")
    actions: Mapping[str, str] = field(default_factory=dict)  # action name -> command
    request_timeout: float = 30.0  # seconds (connect, and the longest gap between bytes)
    poll_jitter: float = 60.0  # seconds, at most, added at random to each poll interval
    busy_wait: float = 300.0  # seconds, at most, one request waits on 503 Retry-After answers

    @classmethod
    def from_settings(cls, settings: AgentSettings, **overrides: object) -> AgentConfig:
        """The agent's configuration from the ``[agent]`` section, every key carried over.

        Args:
            settings: the validated ``[agent]`` section.
            **overrides: fields to set otherwise (e.g. ``agent_id``).

        Returns:
            The configuration; ``agent_id`` is the host name when ``id`` is empty.

        Raises:
            TypeError: a key of ``settings`` or of ``overrides`` is not a field here.
        """
        values: dict[str, Any] = {
            f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)
        }
        values["agent_id"] = values.pop("id") or default_agent_id()
        values.update(overrides)
        return cls(**values)


@dataclass(slots=True)
class RunSummary:
    """What one run did."""

    source: str = ""  # the relay (or origin) used, "" if none
    installed: list[str] = field(default_factory=list)
    uninstalled: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # offers held back: "product version: why"
    next_at: dt.datetime | None = None  # when a held-back offer may go (None: next check-in)
    outcomes: list[ReportEvent] = field(default_factory=list)
    error: str = ""


class RelayFetcher(FetcherInterface):
    """python-tuf fetcher that sends ``Relay-Agent-Id`` (and its token) on every request.

    The agent's own requests (check-in, reports, deltas) go through :meth:`request`
    too: one pool, one timeout, the same headers, the same patience with a busy relay.
    """

    def __init__(
        self, agent_id: str, pool: urllib3.PoolManager, timeout: float, busy_wait: float = 300.0
    ) -> None:
        self._headers = {AGENT_ID_HEADER: agent_id}
        self._pool = pool
        self._timeout = urllib3.Timeout(connect=timeout, read=timeout)
        self.connect_timeout = timeout
        self._busy_wait = busy_wait

    def set_token(self, token: str) -> None:
        """Send ``token`` as ``Relay-Agent-Token`` from now on (from the last check-in)."""
        self._headers[AGENT_TOKEN_HEADER] = token

    def request(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: urllib3.Timeout | None = None,
    ) -> urllib3.BaseHTTPResponse:
        """Send one request (no retries); the body is left to stream.

        Args:
            method: the HTTP method.
            url: the absolute URL.
            body: the request body, if any.
            headers: headers besides ``Relay-Agent-Id``.
            timeout: instead of the agent's request timeout (a long poll).

        A ``503`` with ``Retry-After`` is asked again after that many seconds while
        the waits fit in ``busy_wait`` (whole seconds, with up to 10 % more at random
        so a fleet turned away at once does not come back at once).

        Returns:
            The response; the caller reads it and releases its connection.

        Raises:
            urllib3.exceptions.HTTPError: no connection, or a timeout.
        """
        waited = 0.0
        while True:
            resp = self._pool.request(
                method,
                url,
                body=body,
                preload_content=False,
                headers={**self._headers, **(headers or {})},
                timeout=timeout or self._timeout,
                retries=False,
            )
            wait = retry_after(resp)
            if wait is None or waited + wait > self._busy_wait:
                return resp
            resp.drain_conn()
            resp.release_conn()
            logger.info("%s: relay busy (503), asking again in %.0f s", url, wait)
            time.sleep(wait * (1 + random.random() / 10))
            waited += wait

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            resp = self.request("GET", url, headers=_IDENTITY)
        except urllib3.exceptions.TimeoutError as e:
            raise tuf_exceptions.SlowRetrievalError from e
        except urllib3.exceptions.HTTPError as e:
            raise tuf_exceptions.DownloadError(f"{url}: {e}") from e
        if resp.status >= 400:
            # The error body is not read: close the connection rather than hand it back
            # to the pool with those bytes pending (the next request would read them as
            # its status line).
            resp.close()
            resp.release_conn()
            raise tuf_exceptions.DownloadHTTPError(f"{url}: HTTP {resp.status}", resp.status)
        return self._chunks(resp)

    @staticmethod
    def _chunks(resp: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        try:
            yield from resp.stream(_CHUNK)
        except urllib3.exceptions.TimeoutError as e:
            raise tuf_exceptions.SlowRetrievalError from e
        except urllib3.exceptions.HTTPError as e:
            raise tuf_exceptions.DownloadError(str(e)) from e
        finally:
            resp.release_conn()


def retry_after(resp: urllib3.BaseHTTPResponse) -> float | None:
    """Seconds to wait before asking again: a ``503`` with ``Retry-After`` in seconds.

    ``None`` for any other answer (the date form is not used by relays).
    """
    value = resp.headers.get("Retry-After", "").strip()
    if resp.status != 503 or not value.isascii() or not value.isdigit():
        return None
    return float(value)


class Agent:
    """A reference update agent.

    Args:
        config: the agent's configuration.
        clock: the local time, timezone-aware (schedules are local).
        rng: draws install slots and poll jitter.
        sleep: waits (seconds) between event polls and before checking in.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        clock: Callable[[], dt.datetime] | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self._clock = clock or (lambda: dt.datetime.now().astimezone())
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._pool = urllib3.PoolManager(num_pools=8, maxsize=4)
        self._http = RelayFetcher(
            config.agent_id, self._pool, config.request_timeout, config.busy_wait
        )
        config.state_dir.mkdir(parents=True, exist_ok=True)
        config.install_dir.mkdir(parents=True, exist_ok=True)
        self.state = self._load_state()

    # -- state ---------------------------------------------------------------------

    def _state_path(self) -> Path:
        return self.config.state_dir / STATE_FILE

    def _load_state(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        try:
            loaded = json.loads(self._state_path().read_bytes())
        except (OSError, ValueError):
            loaded = None
        if isinstance(loaded, dict):
            data = loaded
        data.setdefault("installed", {})  # product -> {version, sha256, file, target}
        data.setdefault("pending_reports", [])
        data.setdefault("relay_answer", None)  # {"relays", "origin", "relays_only", "offers"}
        data.setdefault("actions_done", [])  # "product@version" whose actions ran
        data.setdefault("settings", None)  # the group settings of the last check-in
        data.setdefault("generation", "")  # the relay's generation at the last check-in
        data.setdefault("events_relay", "")  # the relay that gave it
        data.setdefault("slot", None)  # the install slot (relay.core.schedule.Slot)
        data.setdefault("last_config_install", None)  # ISO time of the last config install
        return data

    def _save_state(self) -> None:
        path = self._state_path()
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True))
        tmp.replace(path)

    @property
    def installed(self) -> dict[str, dict[str, str]]:
        """Installed products: product -> {version, sha256, file, target}."""
        result: dict[str, dict[str, str]] = self.state["installed"]
        return result

    # -- HTTP ----------------------------------------------------------------------

    def _post(self, url: str, body: dict[str, Any]) -> tuple[int, Any]:
        resp = self._http.request(
            "POST", url, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            raw = resp.read()
        finally:
            resp.release_conn()
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        return resp.status, data

    def _relays(self) -> list[str]:
        seen: list[str] = []
        answer = self.state.get("relay_answer") or {}
        for url in [*self.config.relays, *answer.get("relays", [])]:
            norm = url.rstrip("/") + "/"
            if norm not in seen:
                seen.append(norm)
        return seen

    def _relays_only(self) -> bool:
        answer = self.state.get("relay_answer")
        if answer is not None:
            return bool(answer.get("relays_only"))
        return self.config.relays_only

    def _origin(self) -> str:
        answer = self.state.get("relay_answer")
        if answer is not None and answer.get("origin"):
            return str(answer["origin"]).rstrip("/") + "/"
        return self.config.origin.rstrip("/") + "/" if self.config.origin else ""

    def checkin(self) -> tuple[str, dict[str, Any]] | None:
        """Check in with the first relay that answers; return (relay, answer)."""
        body = {
            "agent_id": self.config.agent_id,
            "group": self.config.group,
            "installed": [
                InstalledItem(p, i["version"], i["sha256"]).to_dict()
                for p, i in sorted(self.installed.items())
            ],
            "accept_delta": list(self.config.accept_delta),
            "defer_days": self.config.defer_days,
        }
        for relay in self._relays():
            try:
                status, data = self._post(f"{relay}v1/checkin", body)
            except urllib3.exceptions.HTTPError as e:
                logger.info("relay %s unreachable: %s", relay, e)
                continue
            if status == 200 and isinstance(data, dict) and isinstance(data.get("offers"), list):
                if isinstance(token := data.get("agent_token"), str):
                    self._http.set_token(token)
                self.state["relay_answer"] = {
                    "relays": [r for r in data.get("relays", []) if isinstance(r, str)],
                    "origin": data.get("origin"),
                    "relays_only": bool(data.get("relays_only")),
                    "poll_seconds": data.get("poll_seconds"),
                    # What the policy allowed this agent: all it may install without a relay.
                    "offers": [o for o in data["offers"] if isinstance(o, dict)],
                }
                self._take_settings(relay, data)
                self._save_state()
                return relay, data
            logger.info("relay %s answered check-in with HTTP %d", relay, status)
        return None

    def _take_settings(self, relay: str, answer: dict[str, Any]) -> None:
        """Keep the group settings and the generation of a check-in answer."""
        raw = answer.get("settings")
        if isinstance(raw, dict):
            try:
                self.state["settings"] = GroupSettings.from_dict(raw).to_dict()
            except ValueError as e:
                logger.warning("settings from %s ignored: %s", relay, e)
        generation = answer.get("generation")
        self.state["generation"] = generation if isinstance(generation, str) else ""
        self.state["events_relay"] = relay

    @property
    def settings(self) -> GroupSettings:
        """The group settings of the last check-in (the defaults before any)."""
        raw = self.state.get("settings")
        if isinstance(raw, dict):
            with contextlib.suppress(ValueError):
                return GroupSettings.from_dict(raw)
        return GroupSettings()

    def send_reports(self, relays: Sequence[str]) -> bool:
        """Send pending reports to the first relay that takes them."""
        pending = self.state["pending_reports"]
        if not pending:
            return True
        for relay in relays:
            try:
                status, _ = self._post(
                    f"{relay}v1/reports",
                    {"agent_id": self.config.agent_id, "events": pending[-1000:]},
                )
            except urllib3.exceptions.HTTPError:
                continue
            if status == 202:
                self.state["pending_reports"] = []
                self._save_state()
                return True
        return False

    # -- TUF ------------------------------------------------------------------------

    def _updater(self, base: str) -> Updater:
        metadata_dir = self.config.state_dir / "metadata"
        metadata_dir.mkdir(parents=True, exist_ok=True)
        downloads = self.config.state_dir / "downloads"
        downloads.mkdir(parents=True, exist_ok=True)
        return Updater(
            metadata_dir=str(metadata_dir),
            metadata_base_url=f"{base}metadata/",
            target_dir=str(downloads),
            target_base_url=f"{base}targets/",
            fetcher=self._http,
            bootstrap=self.config.trusted_root.read_bytes(),
        )

    # -- run ------------------------------------------------------------------------

    def run_once(self) -> RunSummary:
        """Check in, update what is offered, report. Never raises for network trouble."""
        summary = RunSummary()
        got = self.checkin()
        if got is None:
            return self._without_relay(summary)
        relay, answer = got
        updater = self._refreshed(summary, relay, f"through {relay}", "metadata_unavailable")
        if updater is None:
            self.send_reports(self._relays())
            return summary
        for offer in answer["offers"]:
            if not isinstance(offer, dict):
                continue
            self._handle_offer(updater, offer, summary)
        self.send_reports([relay, *self._relays()])
        return summary

    def _without_relay(self, summary: RunSummary) -> RunSummary:
        if self._relays_only():
            self._run_failed(
                summary,
                "relays_unreachable",
                "every relay is unreachable and relays-only is set: not using the origin",
            )
            logger.warning(summary.error)
            return summary
        origin = self._origin()
        if not origin:
            self._run_failed(
                summary,
                "relays_unreachable",
                "every relay is unreachable and no origin is configured",
            )
            return summary
        updater = self._refreshed(
            summary, origin, f"through the origin {origin}", "origin_unreachable"
        )
        if updater is not None:
            for offer in self._offers_without_relay():
                self._handle_offer(updater, offer, summary)
        return summary

    def _offers_without_relay(self) -> list[dict[str, Any]]:
        """What the agent may install from the origin while no relay answers.

        The policy still holds without a relay: an agent that checked in before
        installs only what its last check-in answer offered it (never a declined
        version: those are never offered), full downloads only; an agent that never
        reached a relay installs only the kinds of its ``install_undefined``.
        """
        answer = self.state.get("relay_answer")
        if answer is not None and isinstance(answer.get("offers"), list):
            return [{**o, "delta": None} for o in answer["offers"] if isinstance(o, dict)]
        return self._origin_offers()

    def _refreshed(
        self, summary: RunSummary, base: str, through: str, unreachable: str
    ) -> Updater | None:
        """An updater on ``base`` with refreshed metadata, or None (the failure recorded)."""
        summary.source = base
        try:
            updater = self._updater(base)
            updater.refresh()
        except (tuf_exceptions.RepositoryError, tuf_exceptions.DownloadError, OSError) as e:
            # Refused metadata (a rollback, a bad signature) is not the same as no answer.
            reason = (
                "metadata_rejected"
                if isinstance(e, tuf_exceptions.RepositoryError)
                else unreachable
            )
            self._run_failed(summary, reason, f"metadata refresh {through} failed: {e}")
            return None
        return updater

    def _origin_offers(self) -> list[dict[str, Any]]:
        md = Metadata[Targets].from_file(str(self.config.state_dir / "metadata" / "targets.json"))
        newest: dict[str, Target] = {}
        for tf in md.signed.targets.values():
            try:
                t = Target.from_targetfile(tf)
            except ValueError:
                continue
            if t.info.channel is not Channel.STABLE:
                continue
            if str(t.info.kind) not in self.config.install_undefined:
                continue  # nobody approved it, and its kind does not flow without approval
            if t.product not in newest or newest[t.product].info.semver < t.info.semver:
                newest[t.product] = t
        return [
            {
                "product": t.product,
                "action": "install",
                "target": t.path,
                "version": t.version,
                "sha256": t.sha256,
                "length": t.length,
                "delta": None,
                "mode": "forced",
            }
            for t in newest.values()
        ]

    def _run_failed(self, summary: RunSummary, reason: str, message: str) -> None:
        """Record a failure of the whole run (no product concerned)."""
        summary.error = message
        self._record(summary, ReportEvent("", "", "", Event.FAILED, reason=reason, message=message))

    def _record(self, summary: RunSummary, event: ReportEvent) -> None:
        summary.outcomes.append(event)
        self.state["pending_reports"].append(
            {**event.to_dict(), "message": event.message[:_MESSAGE_MAX]}
        )
        self._save_state()

    def _handle_offer(self, updater: Updater, offer: dict[str, Any], summary: RunSummary) -> None:
        action = offer.get("action")
        product = str(offer.get("product", ""))
        current = self.installed.get(product)
        if action == "uninstall" and current is not None:
            if current.get("version") == offer.get("version"):
                self._uninstall(product, current, summary)
            return
        if action not in ("install", "rollback") or not offer.get("target"):
            return
        if current is not None and current.get("sha256") == offer.get("sha256"):
            return
        if offer.get("mode") == "on-demand" and self.config.defer_days:
            deadline = offer.get("deadline")
            if deadline and dt.datetime.fromisoformat(deadline) > dt.datetime.now(dt.UTC):
                logger.info("%s %s deferred until %s", product, offer.get("version"), deadline)
                return
        to_version = str(offer.get("version", ""))
        event = functools.partial(
            ReportEvent, product, current["version"] if current else "", to_version
        )
        info = updater.get_targetinfo(str(offer["target"]))
        if info is None or info.hashes.get("sha256") != offer.get("sha256"):
            self._fail(
                summary,
                event(
                    Event.FAILED,
                    reason="offer_mismatch",
                    message="the offered target is not in the verified metadata",
                ),
            )
            return
        custom = info.custom if isinstance(info.custom, dict) else {}
        kind = _kind(custom.get("kind"))
        if not self._may_install_now(offer, kind, summary):
            return
        with tempfile.TemporaryDirectory(dir=self.config.state_dir) as tmp:
            staged = Path(tmp) / "staged"
            via, nbytes = Via.FULL, info.length
            delta = offer.get("delta")
            if delta and current is not None:
                try:
                    nbytes = self._apply_delta(
                        delta, current, info.length, info.hashes["sha256"], staged
                    )
                    via = Via.DELTA
                except (PatchRejectedError, AgentError, OSError, urllib3.exceptions.HTTPError) as e:
                    self._record(
                        summary,
                        event(Event.FAILED, via=Via.DELTA, reason="delta_rejected", message=str(e)),
                    )
                    logger.warning("delta for %s refused, using the full target: %s", product, e)
            if via is Via.FULL:
                try:
                    updater.download_target(info, str(staged))
                except (tuf_exceptions.RepositoryError, tuf_exceptions.DownloadError, OSError) as e:
                    self._fail(
                        summary, event(Event.FAILED, reason="download_failed", message=str(e))
                    )
                    return
            self._record(summary, event(Event.DOWNLOADED, via=via, bytes=nbytes))
            try:
                self._install(
                    product, str(offer["target"]), to_version, staged, info.hashes["sha256"]
                )
            except InstallError as e:
                self._fail(summary, event(Event.FAILED, reason=e.reason, message=str(e)))
                return
        self._record(summary, event(Event.INSTALLED, via=via, bytes=nbytes))
        summary.installed.append(f"{product} {to_version}")
        if kind is Kind.CONFIG:
            self.state["last_config_install"] = self._clock().isoformat()
            self._save_state()
        actions = custom.get("actions", [])
        self._run_actions(
            product,
            to_version,
            [*(actions if isinstance(actions, list) else []), *self.settings.after_install],
        )

    def _may_install_now(self, offer: dict[str, Any], kind: Kind, summary: RunSummary) -> bool:
        """Apply the schedule, new-content and once-a-day rules to one offer."""
        settings = self.settings
        now = self._clock()
        slot = None
        if settings.schedule:
            kept = Slot.from_dict(self.state.get("slot"))
            slot = plan_slot(settings.schedule, now, self._rng.random(), kept)
            if slot != kept:
                self.state["slot"] = slot.to_dict() if slot is not None else None
                self._save_state()
        last_config = self.state.get("last_config_install")
        gate = install_gate(
            kind=kind,
            deadline_passed=offer.get("mode") == "forced" and bool(offer.get("deadline")),
            leaving_declined=offer.get("action") == "rollback",
            settings=settings,
            now=now,
            slot=slot,
            last_config_install=dt.datetime.fromisoformat(last_config) if last_config else None,
        )
        if gate.now:
            return True
        summary.waiting.append(f"{offer.get('product')} {offer.get('version')}: {gate.why}")
        if gate.not_before is not None and (
            summary.next_at is None or gate.not_before < summary.next_at
        ):
            summary.next_at = gate.not_before
        logger.info("%s %s held back: %s", offer.get("product"), offer.get("version"), gate.why)
        return False

    def _uninstall(self, product: str, current: dict[str, str], summary: RunSummary) -> None:
        """Remove a declined version: the uninstall command, or delete its file."""
        version = current["version"]
        file = Path(current["file"])
        event = functools.partial(ReportEvent, product, version, "")
        try:
            if self.config.uninstall_command:
                self._run(
                    self.config.uninstall_command,
                    product,
                    version,
                    file,
                    self.config.install_timeout,
                    "uninstall",
                )
            else:
                file.unlink(missing_ok=True)
        except (InstallError, OSError) as e:
            reason = e.reason if isinstance(e, InstallError) else "uninstall_failed"
            self._fail(summary, event(Event.FAILED, reason=reason, message=str(e)))
            return
        del self.installed[product]
        self._save_state()
        self._record(summary, event(Event.UNINSTALLED))
        summary.uninstalled.append(f"{product} {version}")

    def _fail(self, summary: RunSummary, failed: ReportEvent) -> None:
        """Record a product's failure (also listed in ``summary.failed``)."""
        summary.failed.append(f"{failed.product} {failed.to_version}: {failed.reason}")
        self._record(summary, failed)

    def _apply_delta(
        self, delta: dict[str, Any], current: dict[str, str], length: int, sha256: str, out: Path
    ) -> int:
        fmt = DeltaFormat(str(delta.get("format")))
        old = Path(current["file"])
        if hash_file(old)[0] != current["sha256"]:
            raise AgentError(f"installed {old} no longer matches its recorded hash")
        patch = out.with_name("patch")
        resp = self._http.request("GET", str(delta["url"]), headers=_IDENTITY)
        try:
            if resp.status != 200:
                raise AgentError(f"delta download: HTTP {resp.status}")
            if resp.headers.get("Relay-Target-Sha256") not in (None, sha256):
                raise PatchRejectedError("the delta is for another target")
            got = 0
            with patch.open("wb") as f:
                for chunk in resp.stream(_CHUNK):
                    got += len(chunk)
                    if got > length:
                        raise PatchRejectedError("patch larger than the full target")
                    f.write(chunk)
        except BaseException:
            resp.close()  # the rest of the body must not go back to the pool unread
            raise
        finally:
            resp.release_conn()
        apply_patch_file(old, patch, out, fmt=fmt, expected_length=length, expected_sha256=sha256)
        return got

    def _install(
        self, product: str, target_path: str, version: str, staged: Path, sha256: str
    ) -> None:
        directory = self.config.install_dir / product
        directory.mkdir(parents=True, exist_ok=True)
        final = directory / Path(target_path).name
        previous = self.installed.get(product)
        backup: Path | None = None
        if previous is not None and Path(previous["file"]).exists():
            backup = directory / f".{Path(previous['file']).name}.previous"
            shutil.copy2(previous["file"], backup)
        tmp = directory / f".{final.name}.new"
        shutil.copyfile(staged, tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(final)
        if previous is not None and Path(previous["file"]) != final:
            with contextlib.suppress(OSError):
                Path(previous["file"]).unlink()
        try:
            if self.config.install_command:
                self._run(
                    self.config.install_command,
                    product,
                    version,
                    final,
                    self.config.install_timeout,
                    "install",
                )
        except InstallError:
            # Put the previous version back; the failed one is not recorded.
            with contextlib.suppress(OSError):
                final.unlink()
            if backup is not None and previous is not None:
                backup.replace(previous["file"])
            raise
        if backup is not None:
            with contextlib.suppress(OSError):
                backup.unlink()
        self.installed[product] = {
            "version": version,
            "sha256": sha256,
            "file": str(final),
            "target": target_path,
        }
        self._save_state()

    def _run(
        self, command: str, product: str, version: str, file: Path, timeout: float, what: str
    ) -> None:
        env = {
            **os.environ,
            "RELAY_PRODUCT": product,
            "RELAY_VERSION": version,
            "RELAY_FILE": str(file),
        }
        try:
            proc = subprocess.run(
                shlex.split(command),
                env=env,
                timeout=timeout,
                capture_output=True,
                check=False,
                cwd=self.config.install_dir,
            )
        except subprocess.TimeoutExpired:
            raise InstallError(
                f"{what} command timed out after {timeout} s", reason=f"{what}_timeout"
            ) from None
        except OSError as e:
            raise InstallError(f"{what} command cannot run: {e}", reason=f"{what}_failed") from None
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace")[-500:]
            raise InstallError(
                f"{what} command exited with {proc.returncode}: {tail}", reason=f"{what}_failed"
            )

    def _run_actions(self, product: str, version: str, actions: Sequence[object]) -> None:
        key = f"{product}@{version}"
        if not actions or key in self.state["actions_done"]:
            return
        self.state["actions_done"].append(key)
        self._save_state()
        for name in dict.fromkeys(actions):
            command = self.config.actions.get(str(name))
            if not command:
                logger.info("no command configured for action %r", name)
                continue
            try:
                file = Path(self.installed[product]["file"])
                self._run(command, product, version, file, self.config.install_timeout, "action")
            except InstallError as e:
                logger.warning("action %s for %s failed: %s", name, key, e)

    def poll_interval(self) -> float:
        """Seconds to wait before the next run.

        Returns:
            The group settings' ``poll_seconds`` (else the relay's last
            ``poll_seconds``, else :data:`DEFAULT_POLL`) plus up to ``poll_jitter``
            at random, so a fleet does not check in all at once.
        """
        answer = self.state.get("relay_answer") or {}
        poll = DEFAULT_POLL
        if isinstance(self.state.get("settings"), dict):
            poll = float(self.settings.poll_seconds)
        elif isinstance(answer, dict) and isinstance(answer.get("poll_seconds"), int):
            poll = float(answer["poll_seconds"])
        return poll + self._rng.uniform(0, self.config.poll_jitter)

    def next_wait(self, summary: RunSummary) -> float:
        """Seconds until the next run: the poll interval, or sooner for a held-back offer.

        Args:
            summary: the last run's summary (its ``next_at``).

        Returns:
            The seconds to pass to :meth:`wait`.
        """
        wait = self.poll_interval()
        if summary.next_at is not None:
            until = (summary.next_at - self._clock()).total_seconds()
            wait = min(wait, max(until, 0.0))
        return wait

    def wait(self, seconds: float) -> str:
        """Wait up to ``seconds`` for the next run, holding ``GET /v1/events`` meanwhile.

        With events on (the group settings) and a relay that answered the last
        check-in, the agent holds one event request at a time; an answer ends the
        wait after its ``delay_ms``. A relay without events, or a failure, falls back
        to waiting out the interval (failures are retried after a growing pause).

        Args:
            seconds: the longest wait.

        Returns:
            ``"event"`` when an event ended the wait, else ``"poll"``.
        """
        end = time.monotonic() + seconds
        retry = EVENTS_RETRY
        while (left := end - time.monotonic()) > 0:
            relay, since = self.state.get("events_relay"), self.state.get("generation")
            if not (self.settings.events and relay and since):
                self._sleep(left)
                break
            try:
                answer = self._poll_events(str(relay), str(since))
            except (urllib3.exceptions.HTTPError, ValueError) as e:
                logger.info("events from %s failed: %s", relay, e)
                if isinstance(e, _NoEvents):
                    self._sleep(left)
                    break
                self._sleep(min(left, retry))
                retry *= 2
                continue
            if answer is None:
                continue
            delay = answer.get("delay_ms", 0)
            if isinstance(delay, int) and delay > 0:
                self._sleep(min(delay / 1000, max(end - time.monotonic(), 0.0)))
            logger.info("event from %s: %s", relay, answer.get("reasons"))
            return "event"
        return "poll"

    def _poll_events(self, relay: str, since: str) -> dict[str, Any] | None:
        """One ``GET /v1/events``: the answer, ``None`` at the end of the hold.

        Raises:
            urllib3.exceptions.HTTPError: no connection, a timeout, or an unexpected
                status (:class:`_NoEvents` for a relay without events).
            ValueError: a body that is not a JSON object.
        """
        timeout = urllib3.Timeout(connect=self._http.connect_timeout, read=EVENTS_READ_TIMEOUT)
        resp = self._http.request(
            "GET", f"{relay}v1/events?{urlencode({'since': since})}", timeout=timeout
        )
        try:
            raw = resp.read()
        finally:
            resp.release_conn()
        if resp.status == 204:
            return None
        if resp.status in _MISSING_ROUTES:
            raise _NoEvents(f"{relay}: no events (HTTP {resp.status})")
        if resp.status != 200:
            raise urllib3.exceptions.HTTPError(f"{relay}: events answered HTTP {resp.status}")
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("events: expected a JSON object")
        return data

    def close(self) -> None:
        """Release connections."""
        self._pool.clear()


class _NoEvents(urllib3.exceptions.HTTPError):
    """The relay offers no ``GET /v1/events``."""


def _kind(value: object) -> Kind:
    try:
        return Kind(str(value))
    except ValueError:
        return Kind.SOFTWARE


async def run_once_async(agent: Agent) -> RunSummary:
    """Run :meth:`Agent.run_once` in a thread."""
    return await asyncio.to_thread(agent.run_once)


def default_agent_id() -> str:
    """The host name, as an agent id."""
    return socket.gethostname()

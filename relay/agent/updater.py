"""The reference agent, and a library vendors can embed.

One run (:meth:`Agent.run_once`):

1. Check in with the first relay that answers (``POST /v1/checkin``), in order.
2. Refresh TUF metadata through that relay with python-tuf's ``Updater``; its
   metadata directory persists across runs (rollback protection survives
   restarts); every request carries ``Relay-Agent-Id`` (our own fetcher).
3. For each offer to install or roll back: download the delta when one is offered
   and apply it to the verified installed file (declared size checked first, the
   result's sha256 after); otherwise, or if the patch is refused, the full target
   through ``Updater.download_target`` (verified by python-tuf).
4. Install atomically (temp file, ``os.replace``), run the optional install command
   with a timeout (on failure or timeout the previous version is put back), then
   the post-install actions named in the target's ``custom.actions``, once.
5. Report each outcome (``POST /v1/reports``); reports that cannot be sent are
   kept and sent with the next run.

Relays-only (DESIGN §7): until its first successful check-in the agent follows its
own ``relays_only`` setting, then the relay's persisted answer. With relays-only and
every relay down, the origin receives no request at all.

The agent is synchronous (python-tuf's ``Updater`` is): run it in a thread from
asyncio (:func:`run_once_async`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib3
from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from relay.core.protocol import AGENT_ID_HEADER, DeltaFormat, now_rfc3339
from relay.deltas.engine import apply_patch_file
from relay.errors import AgentError, InstallError, PatchRejectedError

logger = logging.getLogger(__name__)

STATE_FILE = "agent.json"


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """Everything the agent needs (units in comments)."""

    agent_id: str
    trusted_root: Path
    state_dir: Path
    install_dir: Path
    relays: tuple[str, ...] = ()
    origin: str = ""
    group: str = "default"
    relays_only: bool = False
    install_command: str = ""  # run with RELAY_PRODUCT, RELAY_VERSION, RELAY_FILE set
    install_timeout: float = 300.0  # seconds
    defer_days: int = 0  # 0, 1, 3 or 7
    accept_delta: tuple[str, ...] = ("zstd", "bsdiff4")
    actions: Mapping[str, str] = field(default_factory=dict)  # action name -> command
    request_timeout: float = 30.0  # seconds (connect, and the longest gap between bytes)


@dataclass(slots=True)
class Outcome:
    """One event for ``/v1/reports``."""

    product: str
    from_version: str
    to_version: str
    event: str
    via: str = "full"
    bytes: int = 0
    reason: str = ""
    message: str = ""
    at: str = field(default_factory=now_rfc3339)

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return {
            "product": self.product,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "event": self.event,
            "via": self.via,
            "bytes": self.bytes,
            "reason": self.reason,
            "message": self.message[:2000],
            "at": self.at,
        }


@dataclass(slots=True)
class RunSummary:
    """What one run did."""

    source: str = ""  # the relay (or origin) used, "" if none
    installed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    error: str = ""


class RelayFetcher(FetcherInterface):
    """python-tuf fetcher that sends ``Relay-Agent-Id`` on every request."""

    def __init__(self, agent_id: str, pool: urllib3.PoolManager, timeout: float) -> None:
        self._agent_id = agent_id
        self._pool = pool
        self._timeout = timeout

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            resp = self._pool.request(
                "GET",
                url,
                preload_content=False,
                headers={AGENT_ID_HEADER: self._agent_id, "Accept-Encoding": "identity"},
                timeout=urllib3.Timeout(connect=self._timeout, read=self._timeout),
                retries=False,
            )
        except urllib3.exceptions.TimeoutError as e:
            raise tuf_exceptions.SlowRetrievalError from e
        except urllib3.exceptions.HTTPError as e:
            raise tuf_exceptions.DownloadError(f"{url}: {e}") from e
        if resp.status >= 400:
            resp.release_conn()
            raise tuf_exceptions.DownloadHTTPError(f"{url}: HTTP {resp.status}", resp.status)
        return self._chunks(resp)

    @staticmethod
    def _chunks(resp: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
        try:
            yield from resp.stream(64 * 1024)
        except urllib3.exceptions.TimeoutError as e:
            raise tuf_exceptions.SlowRetrievalError from e
        except urllib3.exceptions.HTTPError as e:
            raise tuf_exceptions.DownloadError(str(e)) from e
        finally:
            resp.release_conn()


class Agent:
    """A reference update agent."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._pool = urllib3.PoolManager(num_pools=8, maxsize=4)
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
        data.setdefault("relay_answer", None)  # {"relays", "origin", "relays_only"}
        data.setdefault("actions_done", [])  # "product@version" whose actions ran
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
        resp = self._pool.request(
            "POST",
            url,
            body=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", AGENT_ID_HEADER: self.config.agent_id},
            timeout=urllib3.Timeout(
                connect=self.config.request_timeout, read=self.config.request_timeout
            ),
            retries=False,
        )
        try:
            data = json.loads(resp.data) if resp.data else None
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
                {"product": p, "version": i["version"], "sha256": i["sha256"]}
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
                self.state["relay_answer"] = {
                    "relays": [r for r in data.get("relays", []) if isinstance(r, str)],
                    "origin": data.get("origin"),
                    "relays_only": bool(data.get("relays_only")),
                    "poll_seconds": data.get("poll_seconds"),
                }
                self._save_state()
                return relay, data
            logger.info("relay %s answered check-in with HTTP %d", relay, status)
        return None

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
            fetcher=RelayFetcher(self.config.agent_id, self._pool, self.config.request_timeout),
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
        summary.source = relay
        try:
            updater = self._updater(relay)
            updater.refresh()
        except (tuf_exceptions.RepositoryError, tuf_exceptions.DownloadError, OSError) as e:
            self._refresh_failed(
                summary, f"metadata refresh through {relay} failed", e, "metadata_unavailable"
            )
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
            summary.error = (
                "every relay is unreachable and relays-only is set: not using the origin"
            )
            self._record(
                summary,
                Outcome("", "", "", "failed", reason="relays_unreachable", message=summary.error),
            )
            logger.warning(summary.error)
            return summary
        origin = self._origin()
        if not origin:
            summary.error = "every relay is unreachable and no origin is configured"
            self._record(
                summary,
                Outcome("", "", "", "failed", reason="relays_unreachable", message=summary.error),
            )
            return summary
        summary.source = origin
        try:
            updater = self._updater(origin)
            updater.refresh()
        except (tuf_exceptions.RepositoryError, tuf_exceptions.DownloadError, OSError) as e:
            self._refresh_failed(
                summary,
                f"metadata refresh through the origin {origin} failed",
                e,
                "origin_unreachable",
            )
            return summary
        # No relay to decide: the newest stable version of each product.
        for offer in self._origin_offers():
            self._handle_offer(updater, offer, summary)
        return summary

    def _origin_offers(self) -> list[dict[str, Any]]:
        from tuf.api.metadata import Metadata, Targets  # noqa: PLC0415

        from relay.core.model import Channel, Target  # noqa: PLC0415

        md = Metadata[Targets].from_file(str(self.config.state_dir / "metadata" / "targets.json"))
        newest: dict[str, Target] = {}
        for tf in md.signed.targets.values():
            try:
                t = Target.from_targetfile(tf)
            except ValueError:
                continue
            if t.info.channel is not Channel.STABLE:
                continue
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

    def _refresh_failed(
        self, summary: RunSummary, what: str, error: Exception, unreachable: str
    ) -> None:
        summary.error = f"{what}: {error}"
        # Refused metadata (a rollback, a bad signature) is not the same as no answer.
        reason = (
            "metadata_rejected"
            if isinstance(error, tuf_exceptions.RepositoryError)
            else unreachable
        )
        self._record(summary, Outcome("", "", "", "failed", reason=reason, message=summary.error))

    def _record(self, summary: RunSummary, outcome: Outcome) -> None:
        summary.outcomes.append(outcome)
        self.state["pending_reports"].append(outcome.to_dict())
        self._save_state()

    def _handle_offer(self, updater: Updater, offer: dict[str, Any], summary: RunSummary) -> None:
        action = offer.get("action")
        product = str(offer.get("product", ""))
        if action not in ("install", "rollback") or not offer.get("target"):
            return
        current = self.installed.get(product)
        if current is not None and current.get("sha256") == offer.get("sha256"):
            return
        if offer.get("mode") == "on-demand" and self.config.defer_days:
            deadline = offer.get("deadline")
            if deadline and dt.datetime.fromisoformat(deadline) > dt.datetime.now(dt.UTC):
                logger.info("%s %s deferred until %s", product, offer.get("version"), deadline)
                return
        from_version = current["version"] if current else ""
        to_version = str(offer.get("version", ""))
        info = updater.get_targetinfo(str(offer["target"]))
        if info is None or info.hashes.get("sha256") != offer.get("sha256"):
            self._fail(
                summary,
                product,
                from_version,
                to_version,
                "offer_mismatch",
                "the offered target is not in the verified metadata",
            )
            return
        with tempfile.TemporaryDirectory(dir=self.config.state_dir) as tmp:
            staged = Path(tmp) / "staged"
            via, nbytes = "full", info.length
            delta = offer.get("delta")
            if delta and current is not None:
                try:
                    nbytes = self._apply_delta(
                        delta, current, info.length, info.hashes["sha256"], staged
                    )
                    via = "delta"
                except (PatchRejectedError, AgentError, OSError, urllib3.exceptions.HTTPError) as e:
                    self._record(
                        summary,
                        Outcome(
                            product,
                            from_version,
                            to_version,
                            "failed",
                            via="delta",
                            reason="delta_rejected",
                            message=str(e),
                        ),
                    )
                    logger.warning("delta for %s refused, using the full target: %s", product, e)
            if via == "full":
                try:
                    updater.download_target(info, str(staged))
                except (tuf_exceptions.RepositoryError, tuf_exceptions.DownloadError, OSError) as e:
                    self._fail(
                        summary, product, from_version, to_version, "download_failed", str(e)
                    )
                    return
            self._record(
                summary,
                Outcome(product, from_version, to_version, "downloaded", via=via, bytes=nbytes),
            )
            try:
                self._install(
                    product, str(offer["target"]), to_version, staged, info.hashes["sha256"]
                )
            except InstallError as e:
                self._fail(summary, product, from_version, to_version, e.reason, str(e))
                return
        self._record(
            summary, Outcome(product, from_version, to_version, "installed", via=via, bytes=nbytes)
        )
        summary.installed.append(f"{product} {to_version}")
        custom = info.custom if isinstance(info.custom, dict) else {}
        self._run_actions(product, to_version, custom.get("actions", []))

    def _fail(
        self, summary: RunSummary, product: str, from_v: str, to_v: str, reason: str, message: str
    ) -> None:
        summary.failed.append(f"{product} {to_v}: {reason}")
        self._record(
            summary, Outcome(product, from_v, to_v, "failed", reason=reason, message=message)
        )

    def _apply_delta(
        self, delta: dict[str, Any], current: dict[str, str], length: int, sha256: str, out: Path
    ) -> int:
        fmt = DeltaFormat(str(delta.get("format")))
        old = Path(current["file"])
        if _sha256_file(old) != current["sha256"]:
            raise AgentError(f"installed {old} no longer matches its recorded hash")
        patch = out.with_name("patch")
        resp = self._pool.request(
            "GET",
            str(delta["url"]),
            preload_content=False,
            headers={AGENT_ID_HEADER: self.config.agent_id, "Accept-Encoding": "identity"},
            timeout=urllib3.Timeout(
                connect=self.config.request_timeout, read=self.config.request_timeout
            ),
            retries=False,
        )
        try:
            if resp.status != 200:
                raise AgentError(f"delta download: HTTP {resp.status}")
            if resp.headers.get("Relay-Target-Sha256") not in (None, sha256):
                raise PatchRejectedError("the delta is for another target")
            got = 0
            with patch.open("wb") as f:
                for chunk in resp.stream(64 * 1024):
                    got += len(chunk)
                    if got > length:
                        raise PatchRejectedError("patch larger than the full target")
                    f.write(chunk)
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

    def _run_actions(self, product: str, version: str, actions: object) -> None:
        if not isinstance(actions, list):
            return
        key = f"{product}@{version}"
        if key in self.state["actions_done"]:
            return
        self.state["actions_done"].append(key)
        self._save_state()
        for name in actions:
            command = self.config.actions.get(str(name))
            if not command:
                logger.info("no command configured for action %r", name)
                continue
            try:
                file = Path(self.installed[product]["file"])
                self._run(command, product, version, file, self.config.install_timeout, "action")
            except InstallError as e:
                logger.warning("action %s for %s failed: %s", name, key, e)

    def close(self) -> None:
        """Release connections."""
        self._pool.clear()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


async def run_once_async(agent: Agent) -> RunSummary:
    """Run :meth:`Agent.run_once` in a thread."""
    return await asyncio.to_thread(agent.run_once)


def default_agent_id() -> str:
    """The host name, as an agent id."""
    return socket.gethostname()

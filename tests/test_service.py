"""`relay serve` as a service: signals, reload, the data-directory lock, start-up mistakes, logs.

Every test runs the real command in its own process, as systemd or an operator would,
and talks to it over loopback.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import json
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from relay.config import load_config
from relay.publisher.repository import Repository
from tests.support import (
    Origin,
    free_port,
    relay_config,
    relay_state,
    start_relay,
    start_relay_process,
    write_root,
)

RELAY = str(Path(sys.executable).with_name("relay"))  # the command operators run
SIZE = 200_008
RATE = 100_000  # bytes/s: a SIZE download takes about 2 s, far longer than a signal
# Apache's "combined" format, as log tools parse it.
COMBINED = re.compile(
    r"^(?P<host>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4})\] "
    r'"(?P<request>[^"\\]*(?:\\.[^"\\]*)*)" (?P<status>\d{3}) (?P<bytes>\d+|-) '
    r'"(?P<referer>[^"\\]*(?:\\.[^"\\]*)*)" "(?P<agent>[^"\\]*(?:\\.[^"\\]*)*)"$'
)


@dataclass
class Relay:
    """A `relay serve` process, its port, and the lines it wrote on stderr so far."""

    proc: asyncio.subprocess.Process
    port: int
    lines: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def follow(self) -> None:
        async def read() -> None:
            assert self.proc.stderr is not None
            async for raw in self.proc.stderr:
                self.lines.append(raw.decode().rstrip("\n"))
                self.changed.set()

        self.reader = asyncio.create_task(read())

    async def line(self, needle: str) -> str:
        """Wait for a stderr line containing ``needle``."""
        while True:
            for line in self.lines:
                if needle in line:
                    return line
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 20)

    async def stop(self, *, signalled: bool = False) -> int:
        """SIGTERM (unless ``signalled`` already), then the exit code."""
        if not signalled:
            self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), 30)
        if self.reader is not None:
            await self.reader
        return code


@pytest.fixture
async def published(tmp_path, aiohttp_server):
    """A repository with one SIZE-byte target, served by an origin on loopback."""
    repo = Repository.init(tmp_path / "repo")
    blob = os.urandom(SIZE)
    target = repo.add_bytes(blob, "big.bin", product="big", version="1.0.0")
    server = await aiohttp_server(Origin(repo.public_dir).app())
    root = write_root(tmp_path, repo.root_bytes(1))
    return repo, target, str(server.make_url("/")), root


async def _start(args: list[str], env: dict[str, str] | None = None) -> Relay:
    port = free_port()
    proc = await start_relay_process(args, port, env=env)
    relay = Relay(proc, port)
    relay.follow()
    return relay


def _base_args(upstream: str, root: Path, data_dir: Path) -> list[str]:
    return ["--upstream", upstream, "--trusted-root", str(root), "--data-dir", str(data_dir)]


async def _metric(session: aiohttp.ClientSession, relay: Relay, name: str) -> float:
    async with session.get(f"{relay.url}/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


class NotifySocket:
    """systemd's side of sd_notify: a unix datagram socket collecting messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    async def expect(self, key: str) -> list[str]:
        """Wait for a datagram holding ``key`` (such as ``READY=1``); return its lines."""
        loop = asyncio.get_running_loop()
        while True:
            data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), 20)
            lines = data.decode().splitlines()
            if key in lines:
                return lines

    def close(self) -> None:
        self.sock.close()


# -- signals ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_sigterm_lets_a_throttled_download_finish_then_exits_0(published, tmp_path):
    _repo, target, upstream, root = published
    notify = NotifySocket(tmp_path / "notify.sock")
    relay = await _start(
        _base_args(upstream, root, tmp_path / "data"),
        env={
            "RELAY_LIMITS__EGRESS": str(RATE),
            "RELAY_RELAY__DRAIN": "30s",
            "NOTIFY_SOCKET": str(notify.path),
        },
    )
    try:
        assert "READY=1" in await notify.expect("READY=1")
        async with aiohttp.ClientSession() as session:
            url = f"{relay.url}/targets/{target.url_path}"
            async with session.get(url) as r:
                assert r.status == 200
                body = await r.content.readexactly(1024)  # the transfer is under way
                relay.proc.send_signal(signal.SIGTERM)
                await notify.expect("STOPPING=1")
                # Stopped accepting: a new connection is refused while the download goes on.
                with pytest.raises(aiohttp.ClientConnectorError):
                    async with aiohttp.ClientSession() as fresh:
                        await fresh.get(f"{relay.url}/healthz")
                body += await r.read()
        assert hashlib.sha256(body).hexdigest() == target.sha256
        assert await relay.stop(signalled=True) == 0
    finally:
        notify.close()
    stopped = [line for line in relay.lines if "stopped on SIGTERM" in line]
    assert len(stopped) == 1
    assert "1 transfers in flight finished, 0 cut" in stopped[0]
    assert " INFO " in stopped[0]
    assert not any("Traceback" in line for line in relay.lines)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("drain", "second_signal"),
    [("0.5s", False), ("30s", True)],
    ids=["past relay.drain", "a second SIGTERM"],
)
async def test_a_transfer_still_running_is_cut_and_said_so(
    published, tmp_path, drain, second_signal
):
    _repo, target, upstream, root = published
    notify = NotifySocket(tmp_path / "notify.sock")
    env = {"RELAY_LIMITS__EGRESS": str(RATE), "RELAY_RELAY__DRAIN": drain}
    relay = await _start(
        _base_args(upstream, root, tmp_path / "data"),
        env={**env, "NOTIFY_SOCKET": str(notify.path)},
    )
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{relay.url}/targets/{target.url_path}") as r:
                await r.content.readexactly(1024)  # about 2 s of body still to come
                relay.proc.send_signal(signal.SIGTERM)
                await notify.expect("STOPPING=1")
                if second_signal:
                    relay.proc.send_signal(signal.SIGTERM)
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()  # cut: a short body, never a complete-looking one
        assert await relay.stop(signalled=True) == 0
    finally:
        notify.close()
    stopped = await relay.line("stopped on SIGTERM")
    why = "by a second signal" if second_signal else f"at relay.drain ({drain[:-1]} s)"
    assert f"0 transfers in flight finished, 1 cut {why}" in stopped
    assert " WARNING " in stopped


@pytest.mark.timeout(60)
async def test_sigint_stops_cleanly_too(published, tmp_path):
    _repo, _target, upstream, root = published
    relay = await _start(_base_args(upstream, root, tmp_path / "data"))
    relay.proc.send_signal(signal.SIGINT)
    assert await relay.stop(signalled=True) == 0
    assert "stopped on SIGINT" in await relay.line("stopped on")
    # The lock went with the process: the next relay starts on the same directory.
    again = await _start(_base_args(upstream, root, tmp_path / "data"))
    assert await again.stop() == 0


@pytest.mark.timeout(60)
async def test_sighup_applies_live_settings_and_names_the_rest(published, tmp_path):
    _repo, target, upstream, root = published
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    config = tmp_path / "relay.toml"

    def write_config(egress: str, retries: int, poll: int, rollout: str) -> None:
        config.write_text(
            f'[limits]\negress = "{egress}"\n'
            f"[upstream]\nretries = {retries}\n"
            f'[admin]\ntoken_file = "{token_file}"\n'
            f'[policy]\npoll_seconds = {poll}\nrollout_mode = "{rollout}"\n'
        )

    async def checkin_poll_seconds(session: aiohttp.ClientSession) -> int:
        body = {"agent_id": "host-1", "installed": []}
        async with session.post(f"{relay.url}/v1/checkin", json=body) as r:
            return (await r.json())["poll_seconds"]

    write_config("100KB", 3, 600, "forced")
    notify = NotifySocket(tmp_path / "notify.sock")
    relay = await _start(
        ["--config", str(config), *_base_args(upstream, root, tmp_path / "data")],
        env={"NOTIFY_SOCKET": str(notify.path)},
    )
    egress = 'relay_bandwidth_limit_bytes_per_second{limit="egress"}'
    try:
        await notify.expect("READY=1")
        async with aiohttp.ClientSession() as session:
            assert await _metric(session, relay, egress) == 100_000
            assert await checkin_poll_seconds(session) == 600
            # A throttled download in flight across the reload: never dropped.
            async with session.get(f"{relay.url}/targets/{target.url_path}") as download:
                first = await download.content.readexactly(1024)

                write_config("2MB", 5, 900, "on-demand")
                token_file.write_text("second-token\n")
                relay.proc.send_signal(signal.SIGHUP)
                assert "RELOADING=1" in await notify.expect("RELOADING=1")
                await notify.expect("READY=1")
                line = await relay.line("SIGHUP:")
                applied = "limits.egress, policy.rollout_mode, policy.poll_seconds"
                assert f"applied {applied};" in line
                assert "needs a restart: upstream.retries" in line
                assert await _metric(session, relay, egress) == 2_000_000
                assert await checkin_poll_seconds(session) == 900

                admin = f"{relay.url}/v1/admin/settings"
                bearer = {"Authorization": "Bearer first-token"}
                async with session.get(admin, headers=bearer) as r:
                    assert r.status == 401
                bearer = {"Authorization": "Bearer second-token"}
                async with session.get(admin, headers=bearer) as r:
                    assert r.status == 200
                    # A [policy] default never changed through the admin API follows the file.
                    assert (await r.json())["rollout_mode"] == "on-demand"

                body = first + await download.read()
            assert hashlib.sha256(body).hexdigest() == target.sha256

            # A file that does not load changes nothing; the relay keeps running.
            config.write_text("[limits\negress = 1\n")
            relay.proc.send_signal(signal.SIGHUP)
            line = await relay.line("configuration not applied")
            assert "not valid TOML" in line
            assert await _metric(session, relay, egress) == 2_000_000
        assert await relay.stop() == 0
    finally:
        notify.close()


# -- the data directory lock -----------------------------------------------------------


@pytest.mark.timeout(60)
async def test_second_relay_on_the_same_data_directory_exits_2(published, tmp_path):
    _repo, _target, upstream, root = published
    data_dir = tmp_path / "data"
    first = await _start(_base_args(upstream, root, data_dir))
    try:
        code, out, err = await _run(
            "serve", *_base_args(upstream, root, data_dir), "--listen", f"127.0.0.1:{free_port()}"
        )
        assert code == 2
        assert out == ""
        assert err.count("\n") == 1, err
        assert str(data_dir) in err
        assert f"PID {first.proc.pid}" in err
        # The first relay is untouched.
        async with aiohttp.ClientSession() as s, s.get(f"{first.url}/readyz") as r:
            assert r.status == 200
    finally:
        assert await first.stop() == 0


# -- start-up and operator mistakes ------------------------------------------------------


async def _run(*argv: str, preexec_fn=None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        RELAY,
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=preexec_fn,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _without_dac_override() -> None:
    # Root writes anywhere; without these capabilities, mode bits apply to it too.
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


MISTAKES = [
    # (name, what to change, words the one line must hold)
    ("port in use", {"listen": "busy"}, ["port", "in use"]),
    ("address not on this host", {"listen": "192.0.2.1:8080"}, ["192.0.2.1", "not on this host"]),
    ("host name that does not resolve", {"listen": "no-such-host.invalid:8080"}, ["resolve"]),
    ("data dir is a file", {"data_dir": "file"}, ["relay.data_dir", "is a file"]),
    ("data dir not writable", {"data_dir": "read-only"}, ["relay.data_dir", "not writable"]),
    ("part of the data dir is a file", {"data_dir": "state-file"}, ["state", "is a file"]),
    ("trusted root not set", {"root": None}, ["upstream.trusted_root", "not set"]),
    ("trusted root missing", {"root": "missing"}, ["upstream.trusted_root", "cannot be read"]),
    ("trusted root not JSON", {"root": "binary"}, ["upstream.trusted_root", "is not JSON"]),
    ("trusted root is another role", {"root": "timestamp"}, ["is not a TUF root"]),
    ("trusted root unsigned", {"root": "unsigned"}, ["is not a TUF root", "signed by 0/1"]),
    ("agent install dir is a file", {"agent": "--install-dir"}, ["--install-dir", "is a file"]),
    ("agent state dir is a file", {"agent": "--state-dir"}, ["--state-dir", "is a file"]),
]


def _mistake(name, change, published, workdir: Path, busy: socket.socket) -> list[str]:
    """The command line of one mistake, with the files it needs made in ``workdir``."""
    repo, _target, upstream, root = published
    workdir.mkdir()
    data_dir = workdir / "data"
    listen = f"127.0.0.1:{free_port()}"
    if change.get("listen") == "busy":
        listen = f"127.0.0.1:{busy.getsockname()[1]}"
    elif "listen" in change:
        listen = change["listen"]
    if change.get("data_dir") == "file":
        data_dir.write_bytes(b"not a directory")
    elif change.get("data_dir") == "read-only":
        data_dir.mkdir(mode=0o555)
    elif change.get("data_dir") == "state-file":
        data_dir.mkdir()
        (data_dir / "state").write_bytes(b"")
    root_arg: Path | None = root
    if "root" in change:
        kind = change["root"]
        root_arg = None if kind is None else workdir / f"{kind}.json"
        if kind == "binary":
            root_arg.write_bytes(os.urandom(64))
        elif kind == "timestamp":
            root_arg.write_bytes((repo.public_dir / "metadata" / "timestamp.json").read_bytes())
        elif kind == "unsigned":
            root_arg.write_bytes(repo.root_bytes(1).replace(b'"sig":"', b'"sig":"00'))
    if "agent" in change:
        bad = workdir / "a-file"
        bad.write_bytes(b"")
        dirs = {"--state-dir": workdir / "state", "--install-dir": workdir / "opt"}
        dirs[change["agent"]] = bad
        argv = ["agent", "--relay", "http://127.0.0.1:9/", "--trusted-root", str(root), "--once"]
        return argv + [str(a) for pair in dirs.items() for a in pair]
    argv = ["serve", "--upstream", upstream, "--data-dir", str(data_dir), "--listen", listen]
    return argv + (["--trusted-root", str(root_arg)] if root_arg is not None else [])


@pytest.mark.timeout(60)
async def test_every_operator_mistake_is_one_line_and_exit_2(published, tmp_path):
    busy = _listening_socket()
    try:
        argvs = [
            _mistake(name, change, published, tmp_path / f"case{i}", busy)
            for i, (name, change, _words) in enumerate(MISTAKES)
        ]
        # As root, mode bits bind nobody: drop the capabilities that bypass them.
        preexec = _without_dac_override if os.geteuid() == 0 else None
        results = await asyncio.gather(*(_run(*argv, preexec_fn=preexec) for argv in argvs))
        # With -v, the same mistake also shows where it was raised.
        verbose = await _run("-v", *argvs[0], preexec_fn=preexec)
    finally:
        busy.close()
    for (name, _change, words), (code, out, err) in zip(MISTAKES, results, strict=True):
        assert (code, out) == (2, ""), (name, err)
        assert err.count("\n") == 1, (name, err)
        assert err.startswith("relay: cannot start: "), (name, err)
        assert all(word in err for word in words), (name, words, err)
    assert verbose[0] == 2
    assert "Traceback" in verbose[2]
    assert verbose[2].endswith(results[0][2])


# -- logs --------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_access_log_is_combined_format_with_the_body_bytes_sent(published, tmp_path):
    _repo, target, upstream, root = published
    relay = await _start(
        _base_args(upstream, root, tmp_path / "data"), env={"RELAY_RELAY__ACCESS_LOG": "true"}
    )
    url = f"{relay.url}/targets/{target.url_path}"
    agent = {"Relay-Agent-Id": "host-42", "User-Agent": 'probe "quoted"'}
    async with aiohttp.ClientSession() as s:
        for headers in (agent, agent, {**agent, "Range": "bytes=100-199"}):
            async with s.get(url, headers=headers) as r:  # a fill, then sendfile, then a range
                await r.read()
        async with s.head(url) as r:
            assert r.status == 200
        async with s.get(f"{relay.url}/healthz") as r:
            assert r.status == 200
    assert await relay.stop() == 0
    listening = next(line for line in relay.lines if "relay listening on" in line)
    assert " INFO " in listening
    access = [m for m in map(COMBINED.match, relay.lines) if m]
    targets = [m for m in access if m["request"].startswith("GET /targets/")]
    assert [m["bytes"] for m in targets[:3]] == [str(SIZE), str(SIZE), "100"]
    assert [m["status"] for m in targets[:3]] == ["200", "200", "206"]
    first = targets[0]
    assert first["user"] == "host-42"
    assert first["host"] == "127.0.0.1"
    assert first["request"] == f"GET /targets/{target.url_path} HTTP/1.1"
    assert first["agent"] == r"probe \"quoted\""
    head = next(m for m in access if m["request"].startswith("HEAD "))
    assert head["bytes"] == "-"
    assert any(m["request"] == "GET /healthz HTTP/1.1" and m["bytes"] != "-" for m in access)
    loud = [line for line in relay.lines if " WARNING " in line or " ERROR " in line]
    assert loud == []


@pytest.mark.timeout(60)
async def test_json_logs_and_a_reload_back_to_text(published, tmp_path):
    _repo, target, upstream, root = published
    config = tmp_path / "relay.toml"
    config.write_text('[relay]\nlog_format = "json"\n')
    relay = await _start(["--config", str(config), *_base_args(upstream, root, tmp_path / "data")])
    url = f"{relay.url}/targets/{target.url_path}"
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers={"Relay-Agent-Id": "host-7"}) as r:
            assert len(await r.read()) == SIZE
        config.write_text('[relay]\nlog_format = "text"\nlog_level = "warning"\n')
        relay.proc.send_signal(signal.SIGHUP)
        await relay.line("applied relay.log_format")
        async with s.get(url) as r:
            assert len(await r.read()) == SIZE
    assert await relay.stop() == 0
    reload_line = relay.lines.index(await relay.line("applied relay.log_format"))
    # Every line before the reload is JSON (but the interpreter's own warning about
    # `python -m relay.cli.main`, which support.start_relay_process runs).
    before = [line for line in relay.lines[:reload_line] if not line.startswith("<frozen runpy>")]
    records = [json.loads(line) for line in before]
    access = next(
        r
        for r in records
        if r["logger"] == "relay.access"
        and r["method"] == "GET"
        and r["path"].startswith("/targets/")
    )
    assert (access["status"], access["bytes"], access["agent"]) == (200, SIZE, "host-7")
    assert COMBINED.match(access["message"])
    after = relay.lines[reload_line + 1 :]
    targets = [m for m in map(COMBINED.match, after) if m and "/targets/" in m["request"]]
    assert [m["bytes"] for m in targets] == [str(SIZE)]  # access lines whatever the level
    assert not any(" INFO " in line for line in after)  # log_level = "warning" applied
    assert "relay.log_level" in relay.lines[reload_line]


@pytest.mark.timeout(60)
async def test_client_faults_are_not_logged_as_errors(published, tmp_path):
    _repo, target, upstream, root = published
    relay = await _start(
        _base_args(upstream, root, tmp_path / "data"), env={"RELAY_LIMITS__EGRESS": str(RATE)}
    )
    for _ in range(2):  # from the fill, then from the store: paced writes both times
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(f"GET /targets/{target.url_path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        await writer.drain()
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        await reader.readexactly(1024)
        writer.transport.abort()
    # Requests that are not HTTP: 400, and an INFO line each.
    for raw in (
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
        writer.write(raw)
        assert (await reader.readline()).startswith(b"HTTP/1.0 400")
        writer.close()
    async with aiohttp.ClientSession() as s, s.get(f"{relay.url}/metrics") as r:
        assert r.status == 200
    assert await relay.stop() == 0
    access = [line for line in relay.lines if COMBINED.match(line)]
    assert len(access) >= 5, access
    malformed = [line for line in relay.lines if "a malformed request, answered 400" in line]
    assert len(malformed) == 2
    assert all(" INFO aiohttp.server: " in line for line in malformed)
    loud = [line for line in relay.lines if " WARNING " in line or " ERROR " in line]
    assert loud == []
    assert not any("Traceback" in line for line in relay.lines)


# -- deploy/ -------------------------------------------------------------------------------

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


@pytest.mark.parametrize("name", ["top-relay.toml", "child-relay.toml", "agent.toml"])
def test_sample_configurations_load(name):
    config = load_config(DEPLOY / "config" / name, environ={})
    if name == "agent.toml":
        assert config.agent.relays
        assert config.agent.trusted_root.is_absolute()
        return
    # As the systemd unit runs it: the data in its StateDirectory, the root pinned in /etc.
    unit = (DEPLOY / "systemd" / "relay.service").read_text()
    assert f"--data-dir {config.relay.data_dir}" in unit
    assert "StateDirectory=relay\n" in unit
    assert str(config.upstream.trusted_root).startswith("/etc/relay/")
    assert config.upstream.urls
    if name == "child-relay.toml":
        assert config.policy.mode == "replica"
        assert config.upstream.urls[0] == config.policy.parent_url


# -- readiness ------------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_readyz_is_503_once_the_timestamp_expires_and_200_after_a_refresh(
    tmp_path, aiohttp_server, serve_origin
):
    repo = Repository.init(tmp_path / "repo", expires={"timestamp": 3})
    origin = await serve_origin(repo)
    config = relay_config(tmp_path, [origin.url], write_root(tmp_path, repo.root_bytes(1)))
    relay = await start_relay(aiohttp_server, config)
    url = relay.make_url("/readyz")
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            assert (r.status, (await r.json())["reason"]) == (200, None)
        while True:  # the timestamp lasts 3 s and nobody re-signs it
            async with s.get(url) as r:
                body = await r.json()
                if r.status == 503:
                    break
            await asyncio.sleep(0.2)
        assert body["ready"] is False
        assert "expired" in body["reason"]
        # What relay-publish-refresh.timer does, then the relay's next sync.
        repo.expires["timestamp"] = 86400
        repo.refresh()
        await relay_state(relay).mirror.sync_once()
        async with s.get(url) as r:
            assert r.status == 200

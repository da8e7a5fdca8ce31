"""The README's "Use" section, run line by line as an operator would type it.

Each command runs in its own process (``bash -c``), in a temporary directory that also
stands in for ``/var/lib`` and ``/opt``; ports 8000 and 8080 become free ones. A command
ending in ``&`` keeps running in the background; the next line waits until it listens
(the origin) or is ready (the relay), as an operator would look before going on.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.support import coverage_env, free_port

README = Path(__file__).resolve().parent.parent / "README.md"
V1 = os.urandom(64 * 1024)
V2 = V1[:40000] + os.urandom(4096) + V1[40000:]


def use_commands() -> list[str]:
    """The commands of the first ``sh`` block of the README's "Use" section."""
    section = README.read_text(encoding="utf-8").split("\n## Use\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines() if line.strip() and line[0] != "#"]


def _wait_until(check, what: str, proc: subprocess.Popen[bytes], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited {proc.returncode}")
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not come up")


def _listens(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_the_use_section_publishes_serves_and_updates_an_agent_twice(tmp_path):
    commands = use_commands()
    assert any(c.startswith("relay admin sync") for c in commands)
    origin_port, relay_port = free_port(), free_port()
    (tmp_path / "agent-1.0.0.bin").write_bytes(V1)  # the vendor's builds
    (tmp_path / "agent-2.0.0.bin").write_bytes(V2)
    env = {
        **os.environ,
        **coverage_env(),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    for name in ("RELAY_ADMIN__TOKEN", "RELAY_ADMIN_TOKEN"):
        env.pop(name, None)
    background: list[subprocess.Popen[bytes]] = []
    agent_outputs = []
    try:
        for command in commands:
            line = command.split("  #")[0].strip()
            line = line.replace("/var/lib/", f"{tmp_path}/var/lib/")
            line = line.replace("/opt/", f"{tmp_path}/opt/")
            line = re.sub(r"\b8000\b", str(origin_port), line)
            line = re.sub(r"\b8080\b", str(relay_port), line)
            if line.endswith("&"):
                argv = shlex.split(line[:-1])
                proc = subprocess.Popen(  # noqa: S603 - the README's own command
                    argv, cwd=tmp_path, env=env, stderr=subprocess.DEVNULL
                )
                background.append(proc)
                if argv[:2] == ["relay", "serve"]:
                    _wait_until(lambda: _ready(relay_port), "relay serve", proc)
                else:
                    _wait_until(lambda: _listens(origin_port), argv[0], proc)
                continue
            done = subprocess.run(  # noqa: S603 - the README's own command
                ["bash", "-c", line],  # noqa: S607
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            if line.startswith("relay agent"):
                agent_outputs.append(done.stdout)
    finally:
        for proc in background:
            proc.send_signal(signal.SIGTERM)
        for proc in background:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    assert len(agent_outputs) == 2
    assert "installed agent 1.0.0" in agent_outputs[0]
    assert "installed agent 2.0.0" in agent_outputs[1]
    installed = [p.read_bytes() for p in (tmp_path / "opt" / "vendor").rglob("*") if p.is_file()]
    assert V2 in installed


def test_the_set_up_commands_are_unchanged():
    text = README.read_text(encoding="utf-8")
    assert (
        "python3 -m venv .venv && .venv/bin/pip install -q -e . && .venv/bin/relay demo\n" in text
    )
    assert (
        "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]' && "
        ".venv/bin/python -m pytest\n" in text
    )

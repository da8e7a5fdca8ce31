"""Content in seconds, end to end, with real processes: a static origin, a parent relay, a
child relay and agents on the child in their normal loop (one-hour poll interval).

Published at the origin, new content reaches every agent through both relays because each
level holds ``GET /v1/events`` on the one above; the origin serves the blob once.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys

import pytest

from relay.publisher.repository import Repository
from tests.support import free_port, start_relay_process, write_root

AGENTS = 3


async def _static_origin(directory, log):
    """``python -m http.server``: a plain static server in its own process, logging requests."""
    port = free_port()
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "http.server",
            str(port),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(directory),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=err,
        )
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return proc, f"http://127.0.0.1:{port}/"
    proc.kill()
    raise AssertionError("the static origin did not start")


async def _agent(tmp_path, name, relay, root):
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay.cli.main",
        "agent",
        "--relay",
        relay,
        "--trusted-root",
        str(root),
        "--state-dir",
        str(tmp_path / name / "state"),
        "--install-dir",
        str(tmp_path / name / "install"),
        "--id",
        name,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "RELAY_AGENT__POLL_JITTER": "0"},
    )


def _installed(tmp_path, name, product):
    try:
        data = json.loads((tmp_path / name / "state" / "agent.json").read_text())
    except (OSError, ValueError):
        return None
    return data["installed"].get(product, {}).get("version")


async def _until(condition, what, steps=600, pause=0.1):
    for _ in range(steps):
        if condition():
            return
        await asyncio.sleep(pause)
    raise AssertionError(f"not within {steps * pause:.0f} s: {what}")


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_new_content_reaches_every_agent_through_two_relays(tmp_path):
    repo = Repository.init(tmp_path / "repo")
    repo.add_bytes(b"signatures 1\n" * 4000, "sigs.db", product="sigs", version="1.0.0",
                   kind="content")  # fmt: skip
    root = write_root(tmp_path, repo.root_bytes(1))
    log = tmp_path / "origin.log"
    origin, origin_url = await _static_origin(repo.public_dir, log)
    procs = [origin]
    try:
        parent_port, child_port = free_port(), free_port()
        common = ["--trusted-root", str(root)]
        # The top relay polls the static origin (short interval); the child relay's own
        # poll is an hour: only the parent's events make it sync.
        procs.append(
            await start_relay_process(
                ["--upstream", origin_url, "--data-dir", str(tmp_path / "parent"), *common],
                parent_port,
                env={
                    "RELAY_SYNC__INTERVAL": "1",
                    "RELAY_SYNC__JITTER": "0",
                    "RELAY_EVENTS__SPLAY": "1",
                },  # fmt: skip
            )
        )
        parent = f"http://127.0.0.1:{parent_port}/"
        procs.append(
            await start_relay_process(
                ["--upstream", parent, "--data-dir", str(tmp_path / "child"), *common],
                child_port,
                env={"RELAY_SYNC__INTERVAL": "1h", "RELAY_EVENTS__SPLAY": "1"},
            )
        )
        child = f"http://127.0.0.1:{child_port}/"
        names = [f"agent-{i}" for i in range(AGENTS)]
        for name in names:
            procs.append(await _agent(tmp_path, name, child, root))
        await _until(
            lambda: all(_installed(tmp_path, n, "sigs") == "1.0.0" for n in names),
            "every agent installs the first version",
        )

        new = repo.add_bytes(b"signatures 2\n" * 4000, "sigs.db", product="sigs",
                             version="1.1.0", kind="content")  # fmt: skip
        await _until(
            lambda: all(_installed(tmp_path, n, "sigs") == "1.1.0" for n in names),
            "every agent installs the new version",
        )
        blob = f"GET /targets/{new.url_path} "
        served = [line for line in log.read_text().splitlines() if blob in line]
        assert len(served) == 1, served
        assert re.search(r'" 200 ', served[0])
    finally:
        for proc in reversed(procs):
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            await proc.communicate()  # reads and closes the relays' stderr pipes too

"""The leader's worker processes: started, watched, restarted, stopped.

Rules:

* A worker is ``python -m relay.server.worker --leader <socket> --slot <n>
  --event-loop <relay.event_loop>``, in a
  process group of its own (a Ctrl-C on the terminal reaches the leader, which passes
  the stop on, not every process at once), with the leader's environment but
  ``NOTIFY_SOCKET``: only the leader speaks to systemd. Its logs go to the leader's
  stderr. It writes one line, ``listening``, on its stdout once it serves.
* A worker that exits while the relay runs is logged, counted in
  ``relay_worker_restarts_total`` and started again after a back-off (1 s, doubling
  up to :data:`BACKOFF_MAX`; back to 1 s after a minute of running).
* At a stop, each worker gets the leader's signal (it drains as the leader does)
  and is waited for; one still running past the grace is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

READY_LINE = b"listening\n"
"""What a worker writes on its stdout once it serves."""
START_TIMEOUT = 60.0
"""Seconds a worker has to start listening."""
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
HEALTHY_AFTER = 60.0
"""Seconds a worker must run for its back-off to start again from the first."""
_WORKER_MODULE = "relay.server.worker"


def worker_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker: the leader's, without systemd's notification socket."""
    env = dict(os.environ if environ is None else environ)
    env.pop("NOTIFY_SOCKET", None)
    return env


class WorkerPool:
    """The worker processes of one leader (slots 1 .. ``slots`` - 1; the leader is slot 0).

    Args:
        leader_socket: the leader's private socket, which workers forward to.
        slots: the processes serving, the leader included.
        verbose: the leader's ``-v`` count, passed on.
        event_loop: ``relay.event_loop``, passed on (a worker runs on the leader's loop).
        on_restart: called with the slot each time a worker is started again.
    """

    def __init__(
        self,
        leader_socket: Path,
        slots: int,
        *,
        verbose: int = 0,
        event_loop: str = "uvloop",
        on_restart: Callable[[int], None] | None = None,
    ) -> None:
        self._socket = leader_socket
        self._slots = range(1, slots)
        self._verbose = verbose
        self._event_loop = event_loop
        self._on_restart = on_restart
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._stopping = False

    @property
    def pids(self) -> dict[int, int]:
        """The running workers' PIDs, by slot."""
        return {slot: p.pid for slot, p in self._procs.items() if p.returncode is None}

    async def start(self) -> int:
        """Start every worker and wait until each listens (or failed to).

        Returns:
            How many listen; the others are being started again.
        """
        started = await asyncio.gather(*(self._spawn(slot) for slot in self._slots))
        for slot in self._slots:
            task = asyncio.create_task(self._watch(slot), name=f"worker-{slot}")
            self._watchers.add(task)
            task.add_done_callback(self._watchers.discard)
        return sum(started)

    async def _spawn(self, slot: int) -> bool:
        """Start the worker of ``slot``; whether it came to listen."""
        command = [sys.executable, "-m", _WORKER_MODULE, "--leader", str(self._socket)]
        command += ["--slot", str(slot), "--event-loop", self._event_loop]
        command += ["-v"] * self._verbose
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            env=worker_environment(),
            # A process group of its own (a terminal's Ctrl-C reaches the leader only, which
            # passes the stop on); the same session (one scheduling group: a new session
            # would be a separate autogroup, with a CPU share of its own). setpgrp in the
            # child rather than process_group=0, which uvloop's subprocess_exec refuses.
            preexec_fn=os.setpgrp,
        )
        self._procs[slot] = proc
        stdout = proc.stdout
        line = b""
        if stdout is not None:
            with contextlib.suppress(TimeoutError):
                line = await asyncio.wait_for(stdout.readline(), START_TIMEOUT)
        if line != READY_LINE:
            logger.error("worker %d (pid %d) did not start listening", slot, proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            return False
        logger.info("worker %d (pid %d) listening", slot, proc.pid)
        return True

    async def _watch(self, slot: int) -> None:
        delay = BACKOFF_FIRST
        while True:
            proc = self._procs[slot]
            started = time.monotonic()
            code = await proc.wait()
            if self._stopping:
                return
            if time.monotonic() - started >= HEALTHY_AFTER:
                delay = BACKOFF_FIRST
            logger.warning(
                "worker %d (pid %d) exited with %s; starting it again in %.0f s",
                slot,
                proc.pid,
                _exit_status(code),
                delay,
            )
            await asyncio.sleep(delay)  # a stop cancels this task
            delay = min(delay * 2, BACKOFF_MAX)
            if self._on_restart is not None:
                self._on_restart(slot)
            await self._spawn(slot)

    def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to every running worker."""
        for proc in self._procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def stop(self, sig: signal.Signals, grace: float) -> None:
        """Pass ``sig`` on to every worker and wait for them; kill those left after ``grace`` s."""
        self._stopping = True
        for task in list(self._watchers):
            task.cancel()
        self.send_signal(sig)
        running = [p for p in self._procs.values() if p.returncode is None]
        if not running:
            return
        waits = [asyncio.ensure_future(p.wait()) for p in running]
        _done, pending = await asyncio.wait(waits, timeout=grace)
        for proc in running:
            if proc.returncode is None:
                logger.warning("worker pid %d still running after %.0f s: killed", proc.pid, grace)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        if pending:
            await asyncio.wait(pending)


def _exit_status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"status {code}"

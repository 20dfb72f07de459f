"""``ldd up``'s supervisor: the API and one worker on this machine, the worker restarted when it dies.

A worker that dies (the OOM killer, a crash) is started again after a backoff (1 s, then doubling up to 30 s)
while the API keeps answering; its job's lease expires and the new worker's recovery loop queues it again, so
the job resumes from its last checkpoint. A worker that dies ``max_deaths`` times within ``window_s`` is left
down: something is wrong that restarting will not fix. The API stopping stops everything (it is the service).

How the API learns the worker's state: the supervisor writes ``<data_dir>/supervisor.json`` (atomically) each
time it changes, and ``/readyz`` reads it (:func:`worker_check`). A file is simpler than worker heartbeats
in the store and enough here: the embedded mode is one machine, so the reader can also tell a live
supervisor from a file a killed one left behind (its pid). A service run otherwise (``ldd api`` and ``ldd
worker``, docker-compose) has no such file and ``/readyz`` has no worker check, as before.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distill.files import atomic_write_json

STATUS_FILE = "supervisor.json"


def status_path(data_dir: Path) -> Path:
    return data_dir / STATUS_FILE


def exit_reason(returncode: int) -> str:
    return f"killed by signal {-returncode}" if returncode < 0 else f"exited with code {returncode}"


def worker_check(data_dir: Path) -> str | None:
    """The worker's state for ``/readyz``: ``"ok"``, why it is not, or None without a live supervisor."""
    try:
        status = json.loads(status_path(data_dir).read_text())
        os.kill(int(status["supervisor_pid"]), 0)  # a file left by a supervisor that is gone says nothing
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if status.get("worker") == "up":
        return "ok"
    return f"{status.get('worker')}: {status.get('reason')}"


class Supervisor:
    """Runs ``api`` and ``worker`` (argv lists) with ``env``; :meth:`run` until stopped or the API exits."""

    def __init__(
        self, api: list[str], worker: list[str], env: dict[str, str], data_dir: Path, *, max_deaths: int = 5,
        window_s: float = 120.0, backoff_s: float = 1.0, max_backoff_s: float = 30.0,
        log: Callable[[str], None] | None = None,
    ):  # fmt: skip
        self.api_cmd, self.worker_cmd, self.env, self.data_dir = api, worker, env, data_dir
        self.max_deaths, self.window_s = max_deaths, window_s
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.log = log or (lambda line: print(f"ldd: {line}", file=sys.stderr, flush=True))
        self.api: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.deaths: list[float] = []  # monotonic times of the worker's deaths within the window
        self.restart_at: float | None = None
        self.stopping = False

    # -- the status file ---------------------------------------------------------------------------

    def _status(self, worker: str, reason: str | None = None, **extra: Any) -> None:
        body = {"supervisor_pid": os.getpid(), "worker": worker, "worker_pid": self.worker.pid if self.worker else None,
                "reason": reason, "deaths_in_window": len(self.deaths), "updated_at": time.time(), **extra}  # fmt: skip
        atomic_write_json(status_path(self.data_dir), body)

    # -- processes ---------------------------------------------------------------------------------

    def _start(self, cmd: list[str]) -> subprocess.Popen[bytes]:
        # Its own session: stopping it reaches its whole group (the worker's pool process too).
        return subprocess.Popen(cmd, env=self.env, start_new_session=True)

    def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.worker = self._start(self.worker_cmd)
        self._status("up")
        self.api = self._start(self.api_cmd)

    def step(self, now: float) -> int | None:
        """One look at the children; the exit code once the service must stop, else None."""
        assert self.api is not None and self.worker is not None
        if self.api.poll() is not None:
            self.log(f"the API {exit_reason(self.api.returncode)}; stopping")
            return self.api.returncode or 1
        if self.restart_at is None and self.worker.poll() is not None and not self._gave_up():
            self._worker_died(now)
        elif self.restart_at is not None and now >= self.restart_at:
            self.restart_at = None
            self.worker = self._start(self.worker_cmd)
            self._status("up")
            self.log(f"worker restarted (pid {self.worker.pid})")
        return None

    def _gave_up(self) -> bool:
        return len(self.deaths) >= self.max_deaths

    def _worker_died(self, now: float) -> None:
        assert self.worker is not None
        why = exit_reason(self.worker.returncode)
        _kill_group(self.worker.pid)  # what it left running (its pool process) goes with it
        self.deaths = [t for t in self.deaths if now - t < self.window_s] + [now]
        if self._gave_up():
            reason = (f"the worker died {len(self.deaths)} times in {self.window_s:.0f} s (last: {why}); left down "
                      "until ldd up is restarted (see its log)")  # fmt: skip
            self._status("down", reason)
            self.log(reason)
            return
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (len(self.deaths) - 1))
        self.restart_at = now + delay
        self._status("restarting", f"the worker {why}; restarting it in {delay:.0f} s", restart_in_s=delay)
        self.log(f"the worker {why}; restarting it in {delay:.0f} s (the API keeps running)")

    def stop(self, grace: float = 15.0) -> None:
        stop_processes([p for p in (self.worker, self.api) if p is not None], grace)
        status_path(self.data_dir).unlink(missing_ok=True)

    def run(self) -> int:
        """Start both; supervise until SIGINT/SIGTERM or the API exits; stop both. Returns the exit code."""

        def _on_signal(signum: int, frame: Any) -> None:
            self.stopping = True

        old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        code = 0
        try:
            self.start()
            while not self.stopping:
                done = self.step(time.monotonic())
                if done is not None:
                    code = done
                    break
                time.sleep(0.2)
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            self.stop()
        return code


def stop_processes(procs: list[subprocess.Popen[bytes]], grace: float = 15.0) -> None:
    """SIGTERM each (its whole session: the worker's training child too), SIGKILL after ``grace``."""
    for p in procs:
        if p.poll() is None:
            _signal_group(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(p.pid, signal.SIGKILL)
            p.wait()


def _kill_group(pgid: int) -> None:
    _signal_group(pgid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass

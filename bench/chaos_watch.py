"""The chaos bench's observers: background threads that follow the attempts' children in ``/proc``, the
jobs as ``GET /v1/jobs`` shows them and the store's jobs table, while the bench disrupts the stack.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from chaos_figures import job_children, job_sig
from chaos_stack import Stack
from servers import family_table, pid_alive, start_time


class Watcher:
    """Background observers: ``/proc`` (attempt children), ``GET /v1/jobs`` and the store's jobs table."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.rest: dict[str, list[tuple[float, tuple[Any, ...]]]] = {}  # job -> [(t, job_sig)] on change
        self.latest: dict[str, dict[str, Any]] = {}
        self.rest_failures: list[float] = []
        self.sql: dict[str, list[tuple[float, str, int, str | None]]] = {}  # job -> [(t, state, attempts, owner)]
        # "pid:start time" -> {pid, start, job, what, first, last, worker, gone}: every attempt child seen
        self.children: dict[str, dict[str, Any]] = {}
        self.twice: list[dict[str, Any]] = []  # scans that saw two children of one job alive
        self.threads = [
            threading.Thread(target=self._loop, args=(f, dt), daemon=True)
            for f, dt in ((self._scan_proc, 0.2), (self._poll_rest, 0.5), (self._poll_sql, 0.5))
        ]
        self._sql_conn: Any = None

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(15)

    def _loop(self, f: Callable[[], None], dt: float) -> None:
        while not self.stop.is_set():
            try:
                f()
            except Exception as e:  # an observer must outlive anything the bench does to the stack
                print(f"watcher: {type(e).__name__}: {e}", file=sys.stderr)
            self.stop.wait(dt)

    def _scan_proc(self) -> None:
        """Find the attempt children in the workers' process trees, and keep following each one found
        until it is gone, even if its worker died and it was re-parented (an orphan still at work is
        exactly what must be seen)."""
        now = time.time()
        table = family_table(w.pid for w in self.stack.workers if w is not None)
        kids = job_children(table, self.stack.runs_dirs)
        live: dict[str, list[int]] = {}
        with self.lock:
            for pid, (job, what, _ppid) in kids.items():
                started = start_time(pid)
                key = f"{pid}:{started}"
                if key not in self.children:
                    slot = self.stack.worker_slot(pid, table)
                    self.children[key] = {"pid": pid, "start": started, "job": job, "what": what, "first": now,
                                          "worker": slot, "gone": None,
                                          "machine": None if slot is None else self.stack.machine[slot]}  # fmt: skip
            for c in self.children.values():
                if c["gone"] is not None:
                    continue
                if pid_alive(c["pid"], c["start"]):
                    c["last"] = now
                    live.setdefault(c["job"], []).append(c["pid"])
                else:
                    c["gone"] = now
            for job, pids in live.items():
                if len(pids) > 1:
                    self.twice.append({"time": now, "job": job, "pids": sorted(pids)})

    def _poll_rest(self) -> None:
        try:
            r = self.stack.http.get("/v1/jobs", params={"limit": 1000}, timeout=3)
            r.raise_for_status()
            jobs = r.json()["jobs"]
        except (httpx.HTTPError, ValueError, KeyError):
            with self.lock:
                self.rest_failures.append(time.time())
            return
        now = time.time()
        with self.lock:
            for j in jobs:
                self.latest[j["id"]] = j
                hist = self.rest.setdefault(j["id"], [])
                sig = job_sig(j)
                if not hist or hist[-1][1] != sig:
                    hist.append((now, sig))

    def _poll_sql(self) -> None:
        import psycopg

        try:
            if self._sql_conn is None or self._sql_conn.closed:
                self._sql_conn = psycopg.connect(self.stack.store_url, connect_timeout=2, autocommit=True)
            rows = self._sql_conn.execute("SELECT id, state, attempts, lease_owner FROM jobs").fetchall()
        except psycopg.Error:
            if self._sql_conn is not None:
                self._sql_conn.close()
            self._sql_conn = None  # PostgreSQL restarting: connect again next time
            return
        now = time.time()
        with self.lock:
            for job_id, state, attempts, owner in rows:
                hist = self.sql.setdefault(job_id, [])
                if not hist or hist[-1][1:] != (state, attempts, owner):
                    hist.append((now, state, attempts, owner))

    # -- reading what was seen

    def job(self, job_id: str) -> dict[str, Any] | None:
        with self.lock:
            return self.latest.get(job_id)

    def last_busy(self, slot: int) -> float:
        """When the worker in ``slot`` last had a child running (or was started, if later)."""
        with self.lock:
            seen = [c.get("last", c["first"]) for c in self.children.values() if c["worker"] == slot]
        return max([self.stack.worker_started[slot], *seen])

    def live_children(self, what: str | None = None) -> dict[int, dict[str, Any]]:
        """``{pid: child}`` of the children seen and still alive now."""
        with self.lock:
            items = list(self.children.values())
        return {c["pid"]: c for c in items if (what is None or c["what"] == what) and c["gone"] is None
                and pid_alive(c["pid"], c["start"])}  # fmt: skip

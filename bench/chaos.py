"""Reliability under failures (DESIGN section 5): small distillation jobs on the production pairing
(Redis broker, PostgreSQL store, two ``python -m worker`` processes, the API under uvicorn) while
workers are SIGKILLed during training, export and publish, and Redis, PostgreSQL and the API restart.

    python bench/chaos.py                      # 10 distillation jobs, about 15-20 min on the 2-core CPU
    python bench/chaos.py --quick              # 2 jobs, one kill during training (development)
    python bench/chaos.py --jobs 4 --plan train,redis,postgres,api    # choose the disruptions

The stack is the bench's own: a redis-server (append-only file on) and a PostgreSQL cluster on free
ports in temporary folders, so the machine's shared servers are never touched; everything is torn
down at the end, also on Ctrl-C or an error (``--keep`` keeps the folders and logs). Jobs go in over
REST only; the bookkeeping reads the store's tables with SQL, the run folders and ``/proc``.

Figures (each also explained in the report):
- succeeded: jobs in state ``succeeded`` at the end, of those submitted;
- models per job: rows of the store's ``models`` table per job, and folders of the model registry
  whose ``model.json`` names the job (exactly 1 each);
- ran twice at once: an attempt runs its work in child processes whose command lines name the job's
  run folder; ``/proc`` is scanned every 0.2 s and a job is flagged when two such children of it are
  alive at once. Independently, ``progress.jsonl`` may only go back in iterations at a line that says
  it resumed there (or at a fresh start at 0): two trainers writing at once would break that;
- epochs repeated per kill: the last iteration reported before the kill minus the iteration the next
  attempt resumed from (``resumed_from_iter``, cross-checked with ``train.log``), in epochs; after a
  kill in export or publish, the iterations trained again;
- recovery: from the disruption to the affected job's next progress as a client sees it through
  ``GET /v1/jobs`` (a progress record written after the disruption, or the job's end), with the
  lease expiry, the new claim and the new child process as steps for worker kills.

Prints the tables and writes ``bench/results/chaos.json|md`` (``--out`` to change the name).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from report import save

ROOT = Path(__file__).resolve().parents[1]
TERMINAL = ("succeeded", "failed", "cancelled")
KILLS = ("train", "export", "publish")
SERVICES = ("redis", "postgres", "api")
# Six kills and three restarts. A kill in export or publish costs a whole export again (the longest part of a
# small job on this CPU), so there are fewer of those than of kills in training.
FULL_PLAN = ("train", "redis", "export", "postgres", "publish", "train", "api", "publish", "train")
IMAGE_SIZE = (128, 96)
SETTLE_S = 240.0  # the longest a disruption may take to recover before the bench moves on

# ------------------------------------------------------------------------------------------ pure helpers
# (no processes, no network: tests/test_chaos_bench.py checks these)

_CHILD_HEADER = re.compile(r"^=== (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) attempt (\d+): (.+)$")


def parse_child_log(text: str) -> list[tuple[float, int, str]]:
    """``(unix time, attempt, what)`` of each child a worker started, from ``worker_child.log`` headers
    (``=== 2025-01-01 12:00:00 attempt 2: train``; local time, one-second resolution)."""
    out = []
    for line in text.splitlines():
        m = _CHILD_HEADER.match(line.strip())
        if m:
            out.append((time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")), int(m.group(2)), m.group(3)))
    return out


def interleaved_writers(lines: list[dict[str, Any]]) -> list[int]:
    """Indices of ``progress.jsonl`` lines that go back in iterations without saying why.

    One trainer only moves forward; a new attempt's first line goes back to the checkpoint it resumed
    from (``iter == resumed_from_iter``) or to 0 when there was no checkpoint yet. Two trainers writing
    the same file at once interleave, and the older one's next line goes back with no such reason."""
    bad, prev = [], None
    for i, ln in enumerate(lines):
        it = ln.get("iter")
        if it is None:
            continue
        if prev is not None and it < prev and not (it == ln.get("resumed_from_iter") or (it == 0 and not ln.get(
                "resumed_from_iter"))):
            bad.append(i)
        prev = it
    return bad


def epochs_repeated(lines: list[dict[str, Any]], t_gone: float, per_epoch: int) -> dict[str, Any]:
    """What a kill cost a job, from its ``progress.jsonl`` lines; ``t_gone``: when the killed attempt's
    processes were all gone (lines before it are the killed attempt's, lines after it the next one's).

    ``at_iter``: the last iteration the killed attempt reported (the true one is below the next epoch
    end: each epoch end is checkpointed, then reported). ``resumed_from``: where the next attempt's
    training started (None if it did not train again). ``repeated``: ``at_iter - resumed_from`` in
    epochs, the work trained twice; ``trained_after``: iterations trained after the kill."""
    before = [ln for ln in lines if ln.get("time", 0) < t_gone and ln.get("phase") == "train"]
    after = [ln for ln in lines if ln.get("time", 0) >= t_gone and ln.get("phase") == "train"]
    at_iter = max((ln["iter"] for ln in before), default=0)
    if not after:
        return {"at_iter": at_iter, "resumed_from": None, "repeated": 0.0, "trained_after": 0}
    resumed = after[0].get("resumed_from_iter") or 0
    trained_after = max(ln["iter"] for ln in after) - resumed
    return {"at_iter": at_iter, "resumed_from": resumed, "repeated": round(max(0, at_iter - resumed) / per_epoch, 3),
            "trained_after": trained_after}


def job_sig(job: dict[str, Any]) -> tuple[Any, ...]:
    """What of a job, as ``GET /v1/jobs`` shows it, tells that it moved: state, attempt and progress."""
    p = job.get("progress") or {}
    return (job.get("state"), job.get("attempts"), p.get("phase"), p.get("iter"), p.get("time"))


def next_progress(history: list[tuple[float, tuple[Any, ...]]], t: float, min_attempts: int = 0) -> float | None:
    """First time after ``t`` at which a job's REST view (``job_sig`` over time) shows progress written
    after ``t`` (its progress time is later) or its end, by an attempt numbered at least ``min_attempts``."""
    for seen, (state, attempts, _phase, _it, ptime) in history:
        if seen <= t or (attempts or 0) < min_attempts:
            continue
        if (ptime is not None and ptime > t) or state in TERMINAL:
            return seen
    return None


def last_error_line(log: str) -> str | None:
    """The last ``CRITICAL`` or ``ERROR`` record of a worker's log (its traceback lines left out)."""
    found = [ln.strip() for ln in log.splitlines() if re.match(r"^\d{4}-\d\d-\d\d [\d:,]+ (CRITICAL|ERROR) ", ln)]
    return found[-1][:300] if found else None


def first_after(times: Iterable[float], t: float) -> float | None:
    later = [x for x in times if x > t]
    return min(later) if later else None


def seconds(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(b - a, 1)


def fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.1f}" if abs(x) >= 1 or x == 0 else f"{x:.2f}"
    return str(x)


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def _stat(pid: int) -> list[str] | None:
    """Fields 3.. of ``/proc/<pid>/stat`` (state, ppid, ...); None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot): with the pid, it names one process for good."""
    st = _stat(pid)
    return int(st[19]) if st else None


def alive(pid: int, started: int | None = None) -> bool:
    """Running and not a zombie (and, with ``started``, the same process, not a reused pid)."""
    st = _stat(pid)
    return st is not None and st[0] != "Z" and (started is None or int(st[19]) == started)


def family_table(roots: Iterable[int]) -> dict[int, tuple[int, list[str]]]:
    """``{pid: (ppid, argv)}`` of ``roots`` and every live descendant, from /proc's children lists (much
    cheaper than reading every process of a busy machine)."""
    table: dict[int, tuple[int, list[str]]] = {}
    todo = [(r, 0) for r in roots]
    while todo:
        pid, ppid = todo.pop()
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            kids = [int(k) for t in Path(f"/proc/{pid}/task").iterdir() for k in (t / "children").read_text().split()]
        except OSError:
            continue
        if alive(pid):
            table[pid] = (ppid, [a for a in argv if a])
            todo += [(k, pid) for k in kids]
    return table


def descendants(pid: int, table: dict[int, tuple[int, list[str]]] | None = None) -> list[int]:
    table = table if table is not None else family_table([pid])
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for p, (ppid, _) in table.items():
            if ppid == parent:
                out.append(p)
                todo.append(p)
    return out


def job_children(table: dict[int, tuple[int, list[str]]], runs_dir: Path) -> dict[int, tuple[str, str, int]]:
    """``{pid: (job id, "train" | "export", ppid)}``: the top-level child processes of attempts, found by
    the run folder in their command line (a child's own children, e.g. DataLoader workers, are skipped)."""
    pattern = re.compile(re.escape(str(runs_dir)) + r"/(job_[0-9a-f]+)(/|$)")
    found: dict[int, tuple[str, str, int]] = {}
    for pid, (ppid, argv) in table.items():
        if not argv or "python" not in Path(argv[0]).name:
            continue
        for a in argv[1:]:
            m = pattern.match(a)
            if m:
                what = "train" if "distill" in argv and "train" in argv else "export"
                found[pid] = (m.group(1), what, ppid)
                break
    return {p: v for p, v in found.items() if v[2] not in found}


class Stack:
    """The bench's private service: redis-server, a PostgreSQL cluster, the API and the workers."""

    def __init__(self, root: Path, workers: int, env: dict[str, str]):
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.data_dir = root / "ldd"
        self.redis_port, self.pg_port, self.api_port = free_port(), free_port(), free_port()
        # PostgreSQL refuses to run as root: its folder belongs to the postgres user when we are root.
        self.pg_root = Path(tempfile.mkdtemp(prefix="ldd-chaos-pg-"))
        self.as_pg: list[str] = []
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.pg_root, pw.pw_uid, pw.pw_gid)
            self.as_pg = ["runuser", "-u", "postgres", "--"]
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        self.pg_bin = bins[-1].parent if bins else Path(shutil.which("pg_ctl") or "pg_ctl").parent
        self.redis: subprocess.Popen[bytes] | None = None
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes] | None] = [None] * workers
        self.worker_started = [0.0] * workers
        self.worker_log_from = [0] * workers  # where the current process's lines begin in worker<slot>.log
        self.store_url = f"postgresql://postgres@127.0.0.1:{self.pg_port}/ldd"
        # One client for every thread (its pool is thread-safe): a new one per request costs an SSL context.
        self.http = httpx.Client(base_url=self.api_url)
        self.env = {
            **os.environ, **env,
            "LDD_DATA_DIR": str(self.data_dir), "LDD_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "LDD_STORE_URL": self.store_url, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p),
        }  # fmt: skip

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    def _spawn(self, argv: list[str], log: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        with open(self.logs / log, "ab") as out:
            # Own session: a Ctrl-C in the terminal reaches the bench only, which then tears down in order.
            return subprocess.Popen(argv, env=self.env, cwd=cwd or ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    # -- redis

    def start_redis(self) -> None:
        d = self.root / "redis"
        d.mkdir(exist_ok=True)
        self.redis = self._spawn(["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "yes", "--dir", str(d)], "redis.log")  # fmt: skip
        wait_for(self._redis_answers, 20, "redis-server to start")

    def _redis_answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill_redis(self) -> None:
        _kill(self.redis)

    # -- postgres

    def _pg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*self.as_pg, str(self.pg_bin / args[0]), *args[1:]], capture_output=True, check=check,
                              timeout=120)  # fmt: skip

    def init_pg(self) -> None:
        self._pg("initdb", "-D", str(self.pg_root / "data"), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        self.start_pg()
        import psycopg

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.pg_port}/postgres", autocommit=True) as c:
            c.execute("CREATE DATABASE ldd")

    def start_pg(self) -> None:
        opts = (f"-p {self.pg_port} -k {self.pg_root} -c listen_addresses=127.0.0.1 -c max_connections=60 "
                "-c shared_buffers=16MB")  # fmt: skip
        self._pg("pg_ctl", "-D", str(self.pg_root / "data"), "-o", opts, "-l", str(self.pg_root / "pg.log"), "-w",
                 "-t", "60", "start")  # fmt: skip

    def stop_pg(self, mode: str = "immediate") -> None:
        """``immediate``: every server process quits at once, as a crash would (recovery runs on start)."""
        self._pg("pg_ctl", "-D", str(self.pg_root / "data"), "-m", mode, "-w", "stop", check=False)

    # -- the API

    def start_api(self, wait: bool = True) -> None:
        self.api = self._spawn([sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app", "--host",
                                "127.0.0.1", "--port", str(self.api_port), "--no-access-log"], "api.log")  # fmt: skip
        if wait:
            self.wait_api()

    def wait_api(self, timeout: float = 120) -> None:
        def up() -> bool:
            if self.api is not None and self.api.poll() is not None:
                raise RuntimeError(f"the API exited with code {self.api.returncode}; see {self.logs / 'api.log'}")
            try:
                return self.http.get("/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout, "the API to answer", 0.2)

    def kill_api(self) -> None:
        _kill(self.api)

    # -- workers

    def start_worker(self, slot: int) -> int:
        self.workers[slot] = self._spawn([sys.executable, "-m", "worker", "--name", f"chaos{slot}"],
                                         f"worker{slot}.log", cwd=self.root)  # fmt: skip
        self.worker_started[slot] = time.time()
        log = self.logs / f"worker{slot}.log"
        self.worker_log_from[slot] = log.stat().st_size if log.exists() else 0
        return self.workers[slot].pid  # type: ignore[union-attr]

    def worker_log(self, slot: int) -> str:
        """What the worker now in ``slot`` has logged."""
        with open(self.logs / f"worker{slot}.log", "rb") as f:
            f.seek(self.worker_log_from[slot])
            return f.read().decode(errors="replace")

    def worker_slot(self, pid: int, table: dict[int, tuple[int, list[str]]]) -> int | None:
        """The slot of the worker whose process tree holds ``pid``."""
        mains = {w.pid: i for i, w in enumerate(self.workers) if w is not None}
        while pid > 1:
            if pid in mains:
                return mains[pid]
            pid = table.get(pid, (0, []))[0]
        return None

    def close(self) -> None:
        for w in self.workers:  # the workers and their pool and training children
            if w is not None:
                family = descendants(w.pid)
                _kill(w)
                for p in family:
                    _kill_pid(p)
        _kill(self.api)
        _kill(self.redis)
        self.http.close()
        if (self.pg_root / "data" / "postmaster.pid").exists():
            self.stop_pg()


def _kill(p: subprocess.Popen[bytes] | None) -> None:
    if p is not None and p.poll() is None:
        p.send_signal(signal.SIGKILL)
        p.wait(10)


def _kill_pid(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------------------------ watching


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
        self.threads = [threading.Thread(target=self._loop, args=(f, dt), daemon=True)
                        for f, dt in ((self._scan_proc, 0.2), (self._poll_rest, 0.5), (self._poll_sql, 0.5))]
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
        kids = job_children(table, self.stack.runs_dir)
        live: dict[str, list[int]] = {}
        with self.lock:
            for pid, (job, what, _ppid) in kids.items():
                started = start_time(pid)
                key = f"{pid}:{started}"
                if key not in self.children:
                    self.children[key] = {"pid": pid, "start": started, "job": job, "what": what, "first": now,
                                          "worker": self.stack.worker_slot(pid, table), "gone": None}  # fmt: skip
            for c in self.children.values():
                if c["gone"] is not None:
                    continue
                if alive(c["pid"], c["start"]):
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
                and alive(c["pid"], c["start"])}  # fmt: skip


def progress_file(stack: Stack, job_id: str) -> dict[str, Any]:
    try:
        return json.loads((stack.runs_dir / job_id / "progress.json").read_text())
    except (OSError, ValueError):
        return {}


def progress_lines(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    try:
        text = (stack.runs_dir / job_id / "progress.jsonl").read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by the kill
            pass
    return out


def sql_one(stack: Stack, query: str, *args: Any) -> Any:
    import psycopg

    with psycopg.connect(stack.store_url, connect_timeout=5) as conn:
        return conn.execute(query, args).fetchone()


# ------------------------------------------------------------------------------------------ the client


class Submitter:
    """Keeps ``in_flight`` jobs queued or running by submitting the next one whenever one ends; each POST
    carries an ``Idempotency-Key`` and is retried until the API takes it (the API may be down)."""

    def __init__(self, stack: Stack, watcher: Watcher, specs: list[dict[str, Any]], in_flight: int, token: str):
        self.stack, self.watcher, self.specs, self.in_flight, self.token = stack, watcher, specs, in_flight, token
        self.submitted: list[dict[str, Any]] = []  # {id, index, t_post, t_done}
        self.error: str | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _active(self) -> int:
        n = 0
        for s in self.submitted:
            j = self.watcher.job(s["id"])
            n += j is None or j["state"] not in TERMINAL
        return n

    def _run(self) -> None:
        try:
            self._submit_all()
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"

    def _submit_all(self) -> None:
        for i, spec in enumerate(self.specs):
            while not self.stop.is_set() and self._active() >= self.in_flight:
                time.sleep(0.2)
            if self.stop.is_set():
                return
            t0 = time.time()
            job = post_json(self.stack, "/v1/jobs", spec, f"{self.token}-{i}", self.stop)
            if job is None:
                return
            self.submitted.append({"id": job["id"], "index": i, "t_post": t0, "t_done": time.time()})

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


def post_json(stack: Stack, path: str, body: dict[str, Any], key: str, stop: threading.Event | None = None,
              timeout: float = 300) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while not (stop and stop.is_set()):
        try:
            r = stack.http.post(path, json=body, headers={"Idempotency-Key": key}, timeout=10)
            if r.status_code < 500:
                if r.status_code >= 400:
                    raise RuntimeError(f"POST {path} refused: {r.status_code} {r.text}")
                return r.json()
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"POST {path} not accepted within {timeout:.0f} s")
        time.sleep(0.5)
    return None


def upload_dataset(stack: Stack, folder: Path) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # PNGs: compressing again gains nothing
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(folder).as_posix())
    r = stack.http.post("/v1/datasets", files={"file": ("chaos.zip", buf.getvalue(), "application/zip")}, timeout=120)
    if r.status_code != 201:
        raise RuntimeError(f"dataset upload refused: {r.status_code} {r.text}")
    return r.json()["id"]


def schedule(epochs: int) -> dict[str, Any]:
    return {"epochs": epochs, "batch_size": 4, "image_size": list(IMAGE_SIZE), "num_workers": 0, "warmup_iters": 2,
            "lr": 0.01}


def get_job(stack: Stack, job_id: str) -> dict[str, Any] | None:
    try:
        r = stack.http.get(f"/v1/jobs/{job_id}", timeout=5)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


# ------------------------------------------------------------------------------------------ disruptions


@dataclass
class Disruption:
    kind: str
    t: float = 0.0  # when it struck (unix time)
    job: str | None = None  # the job hit (worker kills)
    attempt: int | None = None  # its attempt number then
    at: str = ""  # where it struck, in words
    t_back: float | None = None  # the killed worker's family gone / the service answering again
    affected: list[str] = field(default_factory=list)  # jobs running then (service restarts)
    extra: dict[str, Any] = field(default_factory=dict)


class Chaos:
    def __init__(self, stack: Stack, watcher: Watcher, submitter: Submitter, rng: random.Random, outage_s: float,
                 stall_s: float):
        self.stack, self.watcher, self.submitter, self.rng, self.outage_s = stack, watcher, submitter, rng, outage_s
        self.stall_s = stall_s
        self.rescues: list[Disruption] = []
        self.killed: set[str] = set()
        self.targets: dict[str, int] = {}  # job -> the training iteration at which to kill it
        self.delays: dict[int, float] = {}  # export child pid -> how long after its start to kill it
        self.publish_kills = 0

    def all_done(self) -> bool:
        """Every job submitted and ended. Also the watchdog's tick (every wait of the bench calls this)."""
        if self.submitter.error is not None:
            raise RuntimeError(f"submitting a job failed: {self.submitter.error}")
        self.watchdog()
        subs = self.submitter.submitted
        if len(subs) < len(self.submitter.specs):
            return False
        return all((self.watcher.job(s["id"]) or {}).get("state") in TERMINAL for s in subs)

    def watchdog(self) -> None:
        """A job queued for ``stall_s`` while a worker took nothing for as long: that worker stopped taking
        work (a failure the figures must show; normally an idle worker claims a queued job within seconds).
        Restart it, as an operator would, and record it, so that the bench can go on."""
        now = time.time()
        with self.watcher.lock:
            waiting = {s["id"]: hist[-1][0] for s in self.submitter.submitted
                       if (hist := self.watcher.sql.get(s["id"])) and hist[-1][1] == "queued"}  # fmt: skip
        if not waiting or now - min(waiting.values()) < self.stall_s:
            return
        idle = [slot for slot in range(len(self.stack.workers)) if now - self.watcher.last_busy(slot) > self.stall_s]
        if not idle:
            return
        job = min(waiting, key=waiting.__getitem__)
        d = Disruption("rescue", now, affected=list(waiting), at=f"job {job[-8:]} queued for {now - waiting[job]:.0f} "
                       f"s while worker(s) {', '.join(map(str, idle))} took nothing: restarted (SIGTERM)")  # fmt: skip
        print(f"chaos: {d.at}", file=sys.stderr)
        d.extra["last_errors"] = {slot: last_error_line(self.stack.worker_log(slot)) for slot in idle}
        for slot in idle:
            w = self.stack.workers[slot]
            if w is not None:
                w.terminate()
                try:
                    w.wait(30)
                except subprocess.TimeoutExpired:
                    for p in descendants(w.pid):
                        _kill_pid(p)
                    _kill(w)
            self.stack.start_worker(slot)
        d.t_back = time.time()
        self.rescues.append(d)

    def running_jobs(self) -> list[str]:
        subs = self.submitter.submitted
        return [s["id"] for s in subs if (self.watcher.job(s["id"]) or {}).get("state") == "running"]

    def candidates(self, what: str) -> list[tuple[int, dict[str, Any]]]:
        """Live children of submitted jobs not killed yet, with a known worker, oldest first."""
        ours = {s["id"] for s in self.submitter.submitted}
        live = self.watcher.live_children(what).items()
        return sorted(((p, c) for p, c in live if c["job"] in ours and c["job"] not in self.killed
                       and c["worker"] is not None), key=lambda pc: pc[1]["first"])  # fmt: skip

    def arm(self, pick: Callable[[], Any], what: str) -> Any:
        """Poll ``pick`` until it returns a target; None when every job ended first."""
        while not self.all_done():
            target = pick()
            if target:
                return target
            time.sleep(0.1)
        print(f"chaos: no moment for {what} before the jobs ended; skipped", file=sys.stderr)
        return None

    # -- worker kills

    def kill_worker(self, kind: str) -> Disruption | None:
        pick = {"train": self._pick_train, "export": self._pick_export, "publish": self._pick_publish}[kind]
        target = self.arm(pick, f"a kill during {kind}")
        if target is None:
            return None
        job_id, slot, at = target
        return self._kill(kind, job_id, slot, at)

    def _pick_train(self) -> tuple[str, int, str] | None:
        for _pid, c in self.candidates("train"):
            p = progress_file(self.stack, c["job"])
            total = p.get("total_iters") or 0
            if p.get("phase") != "train" or total < 2 or p.get("iter", 0) >= total:
                continue  # not training (yet, or any more)
            # After the first epoch's checkpoint, so that the kill exercises the resume (a kill in epoch 1
            # simply starts again from scratch).
            per_epoch = total // max(1, p.get("epochs") or 1)
            target = self.targets.setdefault(c["job"], self.rng.randint(min(per_epoch + 1, total - 1), total - 1))
            if p.get("iter", 0) >= target:
                return c["job"], c["worker"], f"train, iter {p['iter']}/{total}"
        return None

    def _pick_export(self) -> tuple[str, int, str] | None:
        now = time.time()
        for pid, c in self.candidates("export"):
            delay = self.delays.setdefault(pid, self.rng.uniform(1.0, 20.0))
            if now - c["first"] >= delay and alive(pid, c["start"]):
                return c["job"], c["worker"], f"export, its child running {now - c['first']:.1f} s"
        return None

    def _pick_publish(self) -> tuple[str, int, str] | None:
        """Follow one export child; once it has exited, watch the registry folder closely and strike when
        this job's model appears there: in its hidden temporary folder (the copy being made and hashed),
        or, every second publish kill, renamed into place (before the store has recorded it)."""
        live = self.candidates("export")
        if not live:
            return None
        pid, c = live[0]
        models = self.stack.models_dir
        while alive(pid, c["start"]):
            time.sleep(0.005)
        t_exit = time.time()
        # The worker notices the exit at its next poll (up to half a second later) before it publishes.
        before = set(os.listdir(models)) if models.is_dir() else set()
        want_final = self.publish_kills % 2 == 1
        while time.time() - t_exit < 20:
            new = (set(os.listdir(models)) if models.is_dir() else set()) - before
            final = sorted(n for n in new if not n.startswith("."))
            hidden = sorted(n for n in new if n.startswith("."))
            if final or (hidden and not want_final):
                self.publish_kills += 1
                where = f"folder {final[0]} in place" if final else f"copy in {hidden[0]}"
                return c["job"], c["worker"], f"publish, {where}, {(time.time() - t_exit) * 1000:.0f} ms after export"
            if (self.watcher.job(c["job"]) or {}).get("state") in TERMINAL:
                return None  # published before we saw it: try the next job
            time.sleep(0.002)
        return None

    def _kill(self, kind: str, job_id: str, slot: int, at: str) -> Disruption:
        w = self.stack.workers[slot]
        assert w is not None
        family = descendants(w.pid)
        d = Disruption(kind, time.time(), job_id, None, at)
        w.send_signal(signal.SIGKILL)  # the main process only: its pool and training children must follow
        w.wait(10)
        self.killed.add(job_id)
        # No other attempt can start before the lease expires: what the store says now is what the kill left.
        state, d.attempt = sql_one(self.stack, "SELECT state, attempts FROM jobs WHERE id = %s", job_id)
        d.extra["job_state"] = state
        d.extra["model_rows"] = sql_one(self.stack, "SELECT count(*) FROM models WHERE job_id = %s", job_id)[0]
        try:
            wait_for(lambda: not any(alive(p) for p in family), 15, "the killed worker's children to die", 0.02)
            d.extra["orphans"] = 0
        except TimeoutError:
            left = [p for p in family if alive(p)]
            d.extra["orphans"] = len(left)
            for p in left:
                _kill_pid(p)
        d.t_back = time.time()
        self.stack.start_worker(slot)
        print(f"chaos: SIGKILLed worker {slot} ({kind}: {job_id}, attempt {d.attempt}, {at})", file=sys.stderr)
        if state == "running":
            self._settle(lambda: self._next_progress_after(job_id, d.t, (d.attempt or 0) + 1))
        return d

    def _next_progress_after(self, job_id: str, t: float, min_attempts: int) -> bool:
        with self.watcher.lock:
            hist = list(self.watcher.rest.get(job_id, []))
        return next_progress(hist, t, min_attempts) is not None

    def _settle(self, done: Callable[[], bool]) -> None:
        try:
            wait_for(lambda: done() or self.all_done(), SETTLE_S, "recovery", 0.2)
        except TimeoutError:
            print("chaos: no recovery within the settle time; going on", file=sys.stderr)

    # -- service restarts

    def restart(self, kind: str) -> Disruption | None:
        if kind == "redis":
            # The moment a job's export child exits: the job ends within a second, the worker acknowledges
            # its message and asks for the next, and the next job is submitted, all while the broker is down.
            def pick() -> bool:
                live = self.candidates("export")
                if not live:
                    return False
                pid, c = live[0]
                while alive(pid, c["start"]):
                    time.sleep(0.005)
                return True
        else:
            def pick() -> bool:
                return any(progress_file(self.stack, j).get("phase") == "train" for j in self.running_jobs())

        if self.arm(pick, f"a {kind} restart") is None:
            return None
        # Watched: the jobs training now (their progress records show when the service works again); a job
        # in export writes none until it ends, so it is listed but not timed.
        running = self.running_jobs()
        training = [j for j in running if progress_file(self.stack, j).get("phase") == "train"]
        d = Disruption(kind, time.time(), affected=training)
        d.extra["also_running"] = [j for j in running if j not in training]
        n_before = len(self.submitter.submitted)
        if kind == "redis":
            self.stack.kill_redis()
            d.at = "SIGKILL, append-only file kept"
            # Down until a job was submitted meanwhile (its message cannot be sent) and then ``outage_s``.
            try:
                wait_for(lambda: len(self.submitter.submitted) > n_before or self.all_done(), 30, "a submission",
                         0.1)  # fmt: skip
            except TimeoutError:
                pass
            time.sleep(self.outage_s)
            self.stack.start_redis()
            d.extra["submitted_while_down"] = [s["id"] for s in self.submitter.submitted[n_before:]]
        elif kind == "postgres":
            self.stack.stop_pg("immediate")
            d.at = "pg_ctl stop -m immediate (a crash), start after the outage"
            time.sleep(self.outage_s)
            self.stack.start_pg()
        else:
            self.stack.kill_api()
            d.at = "SIGKILL, started again at once"
            self.stack.start_api(wait=False)
            self.stack.wait_api()
        d.t_back = time.time()
        print(f"chaos: restarted {kind} (down {d.t_back - d.t:.1f} s)", file=sys.stderr)
        jobs = d.affected + d.extra.get("submitted_while_down", [])
        self._settle(lambda: all(self._next_progress_after(j, d.t, 0) for j in jobs))
        return d


# ------------------------------------------------------------------------------------------ the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="ldd-chaos-"))
    env = {"LDD_LEASE_SECONDS": str(args.lease), "LDD_HEARTBEAT_SECONDS": "1", "LDD_PROGRESS_SECONDS": "1",
           "LDD_RECOVER_SECONDS": "2", "LDD_MAX_ATTEMPTS": "3", "LDD_KILL_GRACE_SECONDS": "5",
           # The worker's own watchdog (worker.hooks) acts well before the bench's (--stall): the bench's
           # restarts count as failures, the worker's as the fix working.
           "LDD_CONSUMER_STALL_SECONDS": "20",
           # Two workers share the two cores: one thread per training child, not two each.
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip
    stack = Stack(root, 2, env)
    watcher = Watcher(stack)
    submitter: Submitter | None = None
    t_start = time.time()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        print(f"chaos: stack under {root} (pg {stack.pg_root})", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "distill.data.synthetic", str(root / "data"), "--train", str(args.images),
                        "--val", "8", "--size", *map(str, IMAGE_SIZE), "--classes", "3", "--seed", str(args.seed)],
                       check=True, cwd=ROOT, env=stack.env, capture_output=True)  # fmt: skip
        stack.init_pg()
        stack.start_redis()
        stack.start_api()
        for slot in range(len(stack.workers)):
            stack.start_worker(slot)
        watcher.start()
        dataset = upload_dataset(stack, root / "data")

        # Teachers: ordinary train jobs on the same data, run before the disruptions start.
        token = f"chaos-{os.getpid()}-{int(t_start)}"
        teacher_archs = ["gfl_tiny"] if args.quick else ["gfl_tiny", "gfl_small"]
        teachers = [post_json(stack, "/v1/jobs", {"kind": "train", "name": f"teacher-{a}", "dataset": dataset,
                                                  "student": {"arch": a}, "schedule": schedule(args.teacher_epochs),
                                                  "seed": 0}, f"{token}-teacher-{a}")
                    for a in teacher_archs]  # fmt: skip
        teacher_ids = [t["id"] for t in teachers if t]
        wait_for(lambda: all((get_job(stack, t) or {}).get("state") in TERMINAL for t in teacher_ids), 900,
                 "the teacher jobs", 1.0)  # fmt: skip
        for t in teacher_ids:
            if (get_job(stack, t) or {}).get("state") != "succeeded":
                raise RuntimeError(f"teacher job {t} did not succeed: {get_job(stack, t)}")
        t_teachers = time.time()
        print(f"chaos: teachers ready after {t_teachers - t_start:.0f} s", file=sys.stderr)

        specs = [{"kind": "distill", "name": f"chaos-{i}", "dataset": dataset, "student": {"arch": "gfl_tiny"},
                  "teacher": {"job": teacher_ids[i % len(teacher_ids)]}, "schedule": schedule(args.epochs),
                  "seed": i} for i in range(args.jobs)]  # fmt: skip
        submitter = Submitter(stack, watcher, specs, len(stack.workers), token)
        submitter.start()
        chaos = Chaos(stack, watcher, submitter, rng, args.outage, args.stall)
        disruptions: list[Disruption] = []
        for kind in args.plan:
            d = chaos.kill_worker(kind) if kind in KILLS else chaos.restart(kind)
            if d is not None:
                disruptions.append(d)
        wait_for(chaos.all_done, 1800, "every job to end", 1.0)
        disruptions = sorted(disruptions + chaos.rescues, key=lambda d: d.t)
        time.sleep(1.5)  # a last look by the observers
        submitter.close()
        watcher.close()
        t_end = time.time()
        return collect(stack, watcher, submitter, disruptions, teacher_ids, args, t_start, t_teachers, t_end)
    finally:
        if submitter is not None:
            submitter.stop.set()
        watcher.stop.set()
        stack.close()
        if args.keep:
            print(f"chaos: kept {root} and {stack.pg_root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
            subprocess.run(["rm", "-rf", str(stack.pg_root)], check=False)


# ------------------------------------------------------------------------------------------ the figures


def collect(stack: Stack, watcher: Watcher, submitter: Submitter, disruptions: list[Disruption],
            teacher_ids: list[str], args: argparse.Namespace, t_start: float, t_teachers: float,
            t_end: float) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(stack.store_url) as conn:
        jobs = {r[0]: {"state": r[1], "attempts": r[2], "model_id": r[3], "error": r[4], "last_error": r[5]}
                for r in conn.execute("SELECT id, state, attempts, model_id, error, last_error FROM jobs")}
        models = conn.execute("SELECT id, job_id, path FROM models").fetchall()
    model_rows: dict[str, int] = {}
    for _id, job_id, _path in models:
        model_rows[job_id] = model_rows.get(job_id, 0) + 1
    # A registry folder belongs to the job whose model row points at it; a folder no row points at is a
    # model published outside the bookkeeping (a second copy, or a publish the store never heard of).
    owner = {Path(path).resolve(): job_id for _id, job_id, path in models}
    folders: dict[str, int] = {}
    leftovers, unattributed = [], []
    for d in sorted(stack.models_dir.iterdir()) if stack.models_dir.is_dir() else []:
        if d.name.startswith("."):
            leftovers.append(d.name)
        elif d.resolve() in owner:
            folders[owner[d.resolve()]] = folders.get(owner[d.resolve()], 0) + 1
        else:
            unattributed.append(d.name)

    children: dict[str, list[dict[str, Any]]] = {}
    for c in watcher.children.values():
        children.setdefault(c["job"], []).append(c)
    per_job = []
    for s in submitter.submitted:
        j_id = s["id"]
        lines = progress_lines(stack, j_id)
        try:
            headers = parse_child_log((stack.runs_dir / j_id / "worker_child.log").read_text(errors="replace"))
        except OSError:
            headers = []
        owners = [o for _, _, _, o in watcher.sql.get(j_id, []) if o]
        per_job.append({
            "job": j_id, "index": s["index"], **jobs.get(j_id, {}),
            "models_store": model_rows.get(j_id, 0), "models_registry": folders.get(j_id, 0),
            "twice_proc": [t for t in watcher.twice if t["job"] == j_id],
            "twice_progress": interleaved_writers(lines),
            "children": sorted(children.get(j_id, []), key=lambda c: c["first"]),
            "child_log": headers, "owners": list(dict.fromkeys(owners)),
            "kills": [d.kind for d in disruptions if d.job == j_id],
            "seconds": seconds(s["t_post"], (watcher.rest.get(j_id) or [(None, None)])[-1][0]),
        })  # fmt: skip

    rows = []
    for d in disruptions:
        row: dict[str, Any] = {"kind": d.kind, "job": d.job, "attempt": d.attempt, "at": d.at, "t": d.t,
                               "down_s": seconds(d.t, d.t_back), **d.extra}  # fmt: skip
        if d.job is not None:
            hist = watcher.sql.get(d.job, [])
            requeued = first_after([t for t, st, _, _ in hist if st == "queued"], d.t)
            claimed = first_after([t for t, st, a, _ in hist if st == "running" and a > (d.attempt or 0)], d.t)
            new_child = first_after([c["first"] for c in children.get(d.job, [])], d.t_back or d.t)
            progress = next_progress(watcher.rest.get(d.job, []), d.t, (d.attempt or 0) + 1)
            lines = progress_lines(stack, d.job)
            p_last = lines[-1] if lines else {}
            per_epoch = max(1, (p_last.get("total_iters") or 1) // max(1, p_last.get("epochs") or 1))
            row.update(requeued_s=seconds(d.t, requeued), claimed_s=seconds(d.t, claimed),
                       child_s=seconds(d.t, new_child), recovery_s=seconds(d.t, progress),
                       # running again: its next child started (or it ended, if nothing was left to run)
                       running_again_s=seconds(d.t, new_child if new_child is not None else progress),
                       per_epoch=per_epoch, **epochs_repeated(lines, d.t_back or d.t, per_epoch))  # fmt: skip
            log = (stack.runs_dir / d.job / "train.log")
            resumed = re.findall(r"resumed from .* at iteration (\d+)", log.read_text() if log.exists() else "")
            row["train_log_resumes"] = [int(x) for x in resumed]
        else:
            # Recovered when every job it touched (running then, or submitted meanwhile) showed progress again.
            watched = d.affected + d.extra.get("submitted_while_down", [])
            times = {j: next_progress(watcher.rest.get(j, []), d.t, 0) for j in watched}
            row["progress_s"] = {j: seconds(d.t, t) for j, t in times.items()}
            row["recovery_s"] = (seconds(d.t, max(times.values())) if times and None not in times.values()
                                 else None)  # fmt: skip
            row["affected"] = watched
            attempts_then = {j: next((a for t, _, a, _ in reversed(watcher.sql.get(j, [])) if t <= d.t), 0)
                             for j in d.affected}  # fmt: skip
            row["attempts_lost"] = sum(1 for j in d.affected
                                       if any(st == "queued" and t > d.t and a >= attempts_then[j]
                                              for t, st, a, _ in watcher.sql.get(j, [])))  # fmt: skip
            if d.extra.get("submitted_while_down"):
                late = d.extra["submitted_while_down"][0]
                claimed = first_after([t for t, st, _, _ in watcher.sql.get(late, []) if st == "running"], d.t)
                row["submitted_claimed_after_back_s"] = seconds(d.t_back, claimed)
        rows.append(row)
    return {
        "settings": {"jobs": args.jobs, "epochs": args.epochs, "teacher_epochs": args.teacher_epochs,
                     "train_images": args.images, "image_size": list(IMAGE_SIZE), "workers": len(stack.workers),
                     "lease_seconds": args.lease, "heartbeat_seconds": 1, "recover_seconds": 2, "max_attempts": 3,
                     "outage_s": args.outage, "plan": list(args.plan), "seed": args.seed, "quick": args.quick},
        "teachers": teacher_ids, "jobs": per_job, "disruptions": rows, "registry_leftovers": leftovers,
        "unattributed_folders": unattributed,
        "rest_failures": len(watcher.rest_failures),
        "minutes": {"total": round((t_end - t_start) / 60, 1), "teachers": round((t_teachers - t_start) / 60, 1),
                    "chaos": round((t_end - t_teachers) / 60, 1)},
        "load_avg": os.getloadavg(),
    }  # fmt: skip


def verdict(res: dict[str, Any]) -> tuple[bool, list[str]]:
    jobs, rows = res["jobs"], res["disruptions"]
    problems = []
    if bad := [j["job"] for j in jobs if j.get("state") != "succeeded"]:
        problems.append(f"jobs not succeeded: {', '.join(bad)}")
    if bad := [j["job"] for j in jobs if (j["models_store"], j["models_registry"]) != (1, 1)]:
        problems.append(f"jobs without exactly one model: {', '.join(bad)}")
    if res["unattributed_folders"]:
        problems.append(f"registry folders without a model row: {', '.join(res['unattributed_folders'])}")
    if bad := [j["job"] for j in jobs if j["twice_proc"] or j["twice_progress"]]:
        problems.append(f"jobs that ran twice at once: {', '.join(bad)}")
    if bad := [r["job"] for r in rows if r["job"] and r.get("repeated", 0) > 1]:
        problems.append(f"kills that repeated more than one epoch: {', '.join(bad)}")
    if bad := [r["job"] for r in rows if r.get("orphans")]:
        problems.append(f"children that outlived their killed worker: {', '.join(bad)}")
    if bad := [r["kind"] for r in rows if r.get("recovery_s") is None and r.get("job_state") not in TERMINAL
               and r["kind"] != "rescue" and (r["job"] or r.get("affected"))]:
        problems.append(f"disruptions without recovery: {', '.join(bad)}")
    for r in rows:
        if r["kind"] == "rescue":
            errors = "; ".join(f"worker {k}'s last error: {v}" for k, v in (r.get("last_errors") or {}).items() if v)
            problems.append(f"a worker stopped taking jobs ({r['at']}{'; ' + errors if errors else ''})")
    if missing := sorted(set(res["settings"]["plan"]) - {r["kind"] for r in rows}):
        problems.append(f"planned disruptions that found no moment: {', '.join(missing)}")
    return not problems, problems


def render(res: dict[str, Any]) -> str:
    s, jobs, rows = res["settings"], res["jobs"], res["disruptions"]
    n = len(jobs)
    ok, problems = verdict(res)
    kills = [r for r in rows if r["job"]]

    def stat(kind: str, key: str = "recovery_s") -> str:
        xs = [r[key] for r in rows if r["kind"] == kind and r.get(key) is not None]
        if not xs:
            return "-"
        if len(xs) == 1:
            return f"{xs[0]:.1f} s"
        return f"{statistics.median(xs):.1f} s median, {max(xs):.1f} s max (n={len(xs)})"

    def kill_stat(kind: str, then: str) -> str:
        if not any(r["kind"] == kind for r in rows):
            return "-"
        return f"running again after {stat(kind, 'running_again_s')}; {then} after {stat(kind)}"

    succeeded = sum(j.get("state") == "succeeded" for j in jobs)
    one_model = sum((j["models_store"], j["models_registry"]) == (1, 1) for j in jobs)
    twice = sum(bool(j["twice_proc"] or j["twice_progress"]) for j in jobs)
    repeated = [r.get("repeated", 0.0) for r in kills]
    held = [text for text, holds in [
        (f"all {n} jobs succeeded", succeeded == n), ("each published exactly one model", one_model == n),
        ("none ran twice at once", twice == 0),
        (f"no kill cost more than one epoch (at most {max(repeated, default=0):.2f})", max(repeated, default=0) <= 1),
    ] if holds]  # fmt: skip
    head = [
        ["jobs that succeeded", f"{succeeded} of {n}", f"{n} of {n}"],
        ["jobs with exactly one model (store rows / registry folders)",
         f"{one_model} of {n} ({sum(j['models_store'] for j in jobs)} rows, {sum(j['models_registry'] for j in jobs)} "
         "folders)", f"{n} of {n}"],
        ["jobs that ran twice at once", str(twice), "0"],
        ["epochs repeated per worker kill (max)", f"{max(repeated):.2f}" if repeated else "-", "<= 1"],
        ["recovery after a worker kill in training", kill_stat("train", "next progress record"),
         f"lease ({s['lease_seconds']:g} s) + start-up"],
        ["recovery after a worker kill in export", kill_stat("export", "ended (the export starts over)"), ""],
        ["recovery after a worker kill in publish", kill_stat("publish", "ended"), ""],
        ["recovery after a Redis restart (next progress)", stat("redis"), ""],
        ["recovery after a PostgreSQL restart (next progress)", stat("postgres"), ""],
        ["recovery after an API restart (next progress)", stat("api"), ""],
    ]  # fmt: skip
    out = [
        "# Chaos: reliability under failures",
        "",
        f"`python bench/chaos.py{' --quick' if s.get('quick') else ''}` "
        f"({' '.join(os.uname()[i] for i in (0, 2))}, {os.cpu_count()} CPUs, load average at the end "
        f"{res['load_avg'][0]:.1f}): {n} distillation jobs (gfl_tiny student from {len(res['teachers'])} teacher "
        f"job(s), gfl_tiny{' and gfl_small' if len(res['teachers']) > 1 else ''}; {s['train_images']} train images "
        f"of {s['image_size'][0]}x{s['image_size'][1]}, {s['epochs']} epochs) on the bench's own Redis "
        f"(append-only) + PostgreSQL + {s['workers']} `python -m worker` processes + the API (uvicorn), "
        f"submitted over REST, {s['workers']} at a time. Lease {s['lease_seconds']:g} s, heartbeat "
        f"{s['heartbeat_seconds']} s, recovery loop every {s['recover_seconds']} s, at most {s['max_attempts']} "
        f"attempts. {res['minutes']['total']} min in all ({res['minutes']['teachers']} min for the teachers).",
        "",
        f"**Verdict: {'PASS' if ok else 'FAIL'}.** " + ("Every job succeeded and published exactly one model; no job "
                                                        "ran twice at once; no kill cost more than one epoch."
                                                        if ok else "; ".join(problems) + "."),
        "" if ok or not held else f"Held: {'; '.join(held)}.",
        "",
        md_table(["figure", "measured", "expected"], head),
        "",
        "## Disruptions",
        "",
        "A worker kill SIGKILLs the worker's main process only, as the OOM killer would; its pool process and "
        "the training or export child must die with it (*gone*: when the last of them was gone; *orphans*: "
        "those still alive 15 s later). The worker is then started again. *requeued*: the store puts the job back "
        "in the queue (its lease expired); *claimed*: a worker takes it again; *running again*: the next attempt's "
        "child process starts. Redis is SIGKILLed (its append-only file kept) the moment a job's export child exits, "
        "so that the job's worker acknowledges it and the next job is submitted while the broker is down. "
        "PostgreSQL is stopped with `pg_ctl -m immediate` (a crash: recovery runs when it starts) while jobs "
        "train. Both stay down for the time shown (*down*). The API "
        "is SIGKILLed and started again at once; *down* is until it answers. *recovery*: until `GET /v1/jobs` shows "
        "a progress record written after the disruption (or the end) of every job it touched: the killed job; "
        "or the jobs training at the time and those submitted during the outage (a job in export writes no "
        "progress records until it ends, so it is not timed). *epochs repeated*: "
        "the last iteration reported before the kill minus the iteration the next attempt resumed from, over the "
        "iterations per epoch. Times in seconds from the disruption.",
        "",
        md_table(["#", "disruption", "job(s)", "where", "down", "gone", "orphans", "requeued", "claimed",
                  "running again", "recovery", "iter at kill", "resumed from", "epochs repeated"],
                 [[i + 1, r["kind"], (r["job"] or "")[-8:] or ", ".join(j[-8:] for j in r.get("affected", [])),
                   r["at"], None if r["job"] else r["down_s"], r["down_s"] if r["job"] else None, r.get("orphans"),
                   r.get("requeued_s"), r.get("claimed_s"), r.get("running_again_s"), r.get("recovery_s"),
                   r.get("at_iter"), r.get("resumed_from"), r.get("repeated")]
                  for i, r in enumerate(rows)]),  # fmt: skip
        "",
    ]
    notes = []
    for r in rows:
        if r["kind"] == "publish":
            notes.append(f"- publish kill on {r['job'][-8:]} ({r['at']}): the store then had {r.get('model_rows')} "
                         f"model row(s) for it and the job was {r.get('job_state')}.")
        if r["kind"] in ("export", "publish") and r.get("trained_after"):
            notes.append(f"- {r['kind']} kill on {r['job'][-8:]}: {r['trained_after']} iterations trained again.")
        if r["kind"] == "train" and r.get("train_log_resumes") and r.get("resumed_from") is not None \
                and r["resumed_from"] not in r["train_log_resumes"]:
            notes.append(f"- train kill on {r['job'][-8:]}: progress.jsonl says resumed from {r['resumed_from']}, "
                         f"train.log {r['train_log_resumes']}.")
        if r["kind"] == "redis" and r.get("affected") is not None:
            late = r.get("submitted_while_down") or []
            notes.append(f"- Redis: {len(late)} job(s) submitted while it was down"
                         + (f"; the first was claimed {fmt(r.get('submitted_claimed_after_back_s'))} s after Redis "
                            "came back (its message was re-sent by the recovery loop)" if late else "") + ".")
        if r["kind"] == "rescue":
            for slot, line in (r.get("last_errors") or {}).items():
                notes.append(f"- the watchdog restarted worker {slot} ({r['at']}); an idle worker normally claims a "
                             f"queued job within seconds. Its last error before: `{line or 'none'}`.")
        if r["kind"] in SERVICES and r.get("attempts_lost"):
            notes.append(f"- {r['kind']}: {r['attempts_lost']} running job(s) lost their attempt (lease) and resumed.")
    if res["registry_leftovers"]:
        notes.append(f"- registry: {len(res['registry_leftovers'])} hidden temporary folder(s) left by killed "
                     f"publishers ({', '.join(res['registry_leftovers'])}); never listed or served.")
    if notes:
        out += ["Notes:", "", *notes, ""]
    out += [
        "## Jobs",
        "",
        md_table(["job", "state", "attempts", "kills", "store rows", "registry folders", "children seen",
                  "two alive at once", "progress goes back", "submit to end (s)"],
                 [[j["job"][-8:], j.get("state"), j.get("attempts"), ", ".join(j["kills"]) or "-", j["models_store"],
                   j["models_registry"], len(j["children"]), len(j["twice_proc"]), len(j["twice_progress"]),
                   j["seconds"]] for j in jobs]),  # fmt: skip
        "",
        "## How \"ran twice at once\" is decided",
        "",
        "The store cannot show it by itself: the lease is one column changed by conditional UPDATEs, so it names "
        "one owner at any time (the owners seen are in chaos.json, one per attempt). What must not happen is that "
        "the process of a lost attempt keeps working while the next one runs. Every attempt does its work in child "
        "processes (`python -m distill train runs/<job>/spec.json`, then the export) whose command line names the "
        "job's run folder; the bench scans `/proc` every 0.2 s and counts a job as run twice when one scan finds two "
        "such children of it alive (*two alive at once*). A kill's children die within milliseconds while the next "
        "attempt starts only after the lease expires, so a scan would see an overlap of any length that matters. "
        "Independently, and without sampling, `progress.jsonl` is read afterwards: one trainer only moves forward, "
        "and a new attempt goes back only to the iteration it says it resumed from (or 0 without a checkpoint); two "
        "trainers appending at once would interleave and go back without saying so (*progress goes back*).",
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=10, help="distillation jobs (default 10)")
    p.add_argument("--quick", action="store_true", help="2 jobs, one teacher, one kill during training")
    p.add_argument("--plan", help=f"comma-separated disruptions, in order, from {', '.join(KILLS + SERVICES)} "
                   f"(default: {','.join(FULL_PLAN)})")  # fmt: skip
    p.add_argument("--epochs", type=int, default=3, help="epochs of each distillation job")
    p.add_argument("--teacher-epochs", type=int, default=2)
    p.add_argument("--images", type=int, default=24, help="training images (4 per iteration)")
    p.add_argument("--lease", type=float, default=10.0, help="LDD_LEASE_SECONDS of the stack")
    p.add_argument("--outage", type=float, default=3.0, help="seconds Redis and PostgreSQL stay down")
    p.add_argument("--stall", type=float, default=45.0,
                   help="a job queued and a worker idle this long: restart that worker (recorded as a failure)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="chaos", help="results name under bench/results/")
    p.add_argument("--keep", action="store_true", help="keep the stack's folders and logs")
    args = p.parse_args(argv)
    if args.quick:
        args.jobs = 2 if args.jobs == 10 else args.jobs
        args.teacher_epochs = 1
        args.epochs = min(args.epochs, 2)
    plan = args.plan.split(",") if args.plan else (["train"] if args.quick else list(FULL_PLAN))
    if unknown := [k for k in plan if k not in KILLS + SERVICES]:
        p.error(f"unknown disruptions {unknown}")
    args.plan = plan
    res = run(args)
    md = render(res)
    print(md)
    path = save(args.out, res, md)
    print(f"wrote {path}", file=sys.stderr)
    return 0 if verdict(res)[0] else 1


if __name__ == "__main__":
    sys.exit(main())

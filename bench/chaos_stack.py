"""The chaos bench's private service: redis-server (append-only), a PostgreSQL cluster, the API under
uvicorn and the ``python -m worker`` processes, each on a free port or in a temporary folder, and what the
bench reads back from them (a job's progress files, one SQL row).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from servers import RedisServer, descendants, free_port, kill, kill_pid, wait_for

ROOT = Path(__file__).resolve().parents[1]


class Stack:
    """The bench's private service: redis-server, a PostgreSQL cluster, the API and the workers."""

    def __init__(self, root: Path, workers: int, env: dict[str, str]):
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.data_dir = root / "ldd"
        self.pg_port, self.api_port = free_port(), free_port()
        self.redis = RedisServer(root / "redis", appendonly=True, log=self.logs / "redis.log")
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
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes] | None] = [None] * workers
        self.worker_started = [0.0] * workers
        self.worker_log_from = [0] * workers  # where the current process's lines begin in worker<slot>.log
        self.store_url = f"postgresql://postgres@127.0.0.1:{self.pg_port}/ldd"
        # One client for every thread (its pool is thread-safe): a new one per request costs an SSL context.
        self.http = httpx.Client(base_url=self.api_url)
        self.env = {
            **os.environ, **env,
            "LDD_DATA_DIR": str(self.data_dir), "LDD_BROKER_URL": self.redis.url,
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
        kill(self.api)

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
                kill(w)
                for p in family:
                    kill_pid(p)
        kill(self.api)
        self.redis.stop()
        self.http.close()
        if (self.pg_root / "data" / "postmaster.pid").exists():
            self.stop_pg()


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

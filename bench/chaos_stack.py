"""The chaos bench's private service: redis-server (append-only), a PostgreSQL cluster, the API under
uvicorn and the ``python -m worker`` processes, each on a free port or in a temporary folder, and what the
bench reads back from them (a job's progress files, one SQL row, the stored models).

Two layouts (``storage``): ``local``, one data folder shared by the API and every worker (the single-machine
mode, no ``LDD_STORAGE_URL``); ``s3``, moto's S3 server (``servers.moto_s3_server``) holds every artifact and
each worker has a data folder of its own, as on a machine of its own (``machines/m<n>``; the API's is
``machines/api``). A machine that is lost (``lose_machine``) has the observation files of its runs copied to
``lost/<machine>`` first (the logs a monitoring system would have shipped off it), then its folder is deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
from servers import (
    RedisServer,
    descendants,
    free_port,
    kill,
    kill_pid,
    make_bucket,
    moto_s3_server,
    s3_client,
    s3_env,
    wait_for,
)

from core.storage import S3Storage

ROOT = Path(__file__).resolve().parents[1]


class Stack:
    """The bench's private service: redis-server, a PostgreSQL cluster, the API and the workers."""

    def __init__(self, root: Path, workers: int, env: dict[str, str], storage: str = "local"):
        self.root = root
        self.storage = storage  # "local" (one shared data folder) or "s3" (a data folder per machine)
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
        self.machines: list[str] = []  # every worker machine started, in order (s3); lost ones stay listed
        self.machine: list[str] = ["shared"] * workers  # the machine of each slot's worker now
        self.lost: list[str] = []
        self.bucket = ""
        self._s3: Any = None
        self._exit = ExitStack()  # moto's server
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

    # -- the data folders, per machine

    def machine_dir(self, machine: str) -> Path:
        """The data folder (``LDD_DATA_DIR``) of a worker machine, or of the API (``api``)."""
        return self.data_dir if self.storage == "local" else self.root / "machines" / machine

    @property
    def runs_dirs(self) -> list[Path]:
        """Every folder a job's run folder is or was in: each machine's ``runs`` (lost ones: their copied logs)."""
        if self.storage == "local":
            return [self.data_dir / "runs"]
        return [(self.root / "lost" if m in self.lost else self.root / "machines") / m / "runs" for m in self.machines]

    def run_dirs(self, job_id: str) -> list[Path]:
        return [d / job_id for d in self.runs_dirs if (d / job_id).is_dir()]

    def registry_dir(self, slot: int) -> Path:
        """The model registry the worker in ``slot`` publishes into (with s3: its staging copy, then uploaded)."""
        if self.storage == "local":
            return self.data_dir / "models"
        return self.machine_dir(self.machine[slot]) / "cache" / "models"

    def _spawn(
        self, argv: list[str], log: str, cwd: Path | None = None, data_dir: Path | None = None
    ) -> subprocess.Popen[bytes]:
        env = self.env if data_dir is None else {**self.env, "LDD_DATA_DIR": str(data_dir)}
        with open(self.logs / log, "ab") as out:
            # Own session: a Ctrl-C in the terminal reaches the bench only, which then tears down in order.
            return subprocess.Popen(argv, env=env, cwd=cwd or ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    # -- object storage (s3)

    def start_storage(self) -> None:
        """moto's S3 server and a bucket; every process started after this stores its artifacts there."""
        if self.storage != "s3":
            return
        endpoint = self._exit.enter_context(moto_s3_server())
        self.bucket = make_bucket(endpoint, f"chaos-{os.getpid()}")
        self.env.update({"LDD_STORAGE_URL": f"s3://{self.bucket}/ldd", **s3_env(endpoint)})
        self._s3 = S3Storage(self.bucket, "ldd", client=s3_client(endpoint))  # the service's own client code

    def stored_keys(self, prefix: str) -> list[str]:
        """The storage keys of the object ``prefix`` or under the folder ``prefix`` (without the bucket's ``ldd/``)."""
        return self._s3.list(prefix)

    def stored_bytes(self, key: str) -> bytes | None:
        try:
            return self._s3.read_bytes(key)
        except FileNotFoundError:
            return None

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
                                "127.0.0.1", "--port", str(self.api_port), "--no-access-log"], "api.log",
                               data_dir=self.machine_dir("api"))  # fmt: skip
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

    def start_worker(self, slot: int, new_machine: bool = False) -> int:
        """Start the worker of ``slot``; with s3 on its machine's data folder, or on a new empty machine's."""
        name = f"chaos{slot}"
        if self.storage == "s3":
            if new_machine or self.machine[slot] == "shared":
                self.machine[slot] = f"m{len(self.machines)}"
                self.machines.append(self.machine[slot])
            name = f"chaos-{self.machine[slot]}"
        self.workers[slot] = self._spawn([sys.executable, "-m", "worker", "--name", name], f"worker{slot}.log",
                                         cwd=self.root, data_dir=self.machine_dir(self.machine[slot]))  # fmt: skip
        self.worker_started[slot] = time.time()
        log = self.logs / f"worker{slot}.log"
        self.worker_log_from[slot] = log.stat().st_size if log.exists() else 0
        return self.workers[slot].pid  # type: ignore[union-attr]

    def worker_log(self, slot: int) -> str:
        """What the worker now in ``slot`` has logged."""
        with open(self.logs / f"worker{slot}.log", "rb") as f:
            f.seek(self.worker_log_from[slot])
            return f.read().decode(errors="replace")

    def lose_machine(self, slot: int) -> list[str]:
        """The machine of ``slot`` is gone (its processes killed already): keep the observation files of its runs
        (progress records and logs, under ``lost/<machine>``), then delete its data folder. The files kept."""
        machine = self.machine[slot]
        src, dst = self.machine_dir(machine) / "runs", self.root / "lost" / machine / "runs"
        kept = []
        for path in sorted(src.glob("*/*")) if src.is_dir() else []:
            if path.is_file() and path.name in OBSERVED:
                (dst / path.parent.name).mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dst / path.parent.name / path.name)
                kept.append(f"{path.parent.name}/{path.name}")
        self.lost.append(machine)
        shutil.rmtree(self.machine_dir(machine))
        return kept

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
        self._exit.close()


# What the bench reads from a run folder (kept from a lost machine).
OBSERVED = ("progress.json", "progress.jsonl", "train.log", "worker_child.log")


def progress_file(stack: Stack, job_id: str) -> dict[str, Any]:
    """The job's latest progress record (with s3: the newest of the machines' that ran it)."""
    found = []
    for d in stack.run_dirs(job_id):
        try:
            found.append(json.loads((d / "progress.json").read_text()))
        except (OSError, ValueError):
            pass
    return max(found, key=lambda p: p.get("time") or 0, default={})


def progress_lines(stack: Stack, job_id: str) -> list[dict[str, Any]]:
    """The job's ``progress.jsonl`` lines; with s3 those of every machine that ran it, in time order (never
    copied between machines: each attempt's are on its own machine's disk)."""
    out: list[dict[str, Any]] = []
    for d in stack.run_dirs(job_id):
        try:
            text = (d / "progress.jsonl").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut by the kill
                pass
    return out if stack.storage == "local" else sorted(out, key=lambda ln: ln.get("time") or 0)


def run_texts(stack: Stack, job_id: str, name: str) -> list[str]:
    """A run folder's log ``name`` on each machine that has (or had) it; with s3 a machine that resumed the run
    fetched the stored copy and appends to it, so lines repeat between copies."""
    return [(d / name).read_text(errors="replace") for d in stack.run_dirs(job_id) if (d / name).is_file()]


def sql_one(stack: Stack, query: str, *args: Any) -> Any:
    import psycopg

    with psycopg.connect(stack.store_url, connect_timeout=5) as conn:
        return conn.execute(query, args).fetchone()

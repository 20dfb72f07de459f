"""Helpers for tests that run the real service parts: a fresh PostgreSQL database, a private
redis-server, and Celery worker subprocesses (``python -m worker``). The process helpers (free ports,
waiting, redis-server, ``/proc``) are ``bench/servers.py``'s, shared with the chaos bench.

Plain functions and context managers (no fixtures here), so any test module can build the fixtures
it needs from them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bench import servers
from bench.servers import descendants, pid_alive, wait_for
from core.queue import enqueue
from core.settings import Settings
from core.store import TERMINAL_STATES, Store

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN_URL = os.environ.get("LDD_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextmanager
def postgres_database() -> Iterator[str]:
    """A new, empty PostgreSQL database on the local server, dropped afterwards; yields its URL."""
    psycopg = pytest.importorskip("psycopg")
    name = f"ldd_test_{secrets.token_hex(4)}"
    conninfo = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        admin = psycopg.connect(conninfo, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:
        pytest.skip(f"PostgreSQL not reachable at {PG_ADMIN_URL}: {e}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = conninfo.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(conninfo, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class RedisServer(servers.RedisServer):
    """A private redis-server (``bench.servers.RedisServer``, no persistence); the test is skipped where
    redis-server is not installed."""

    def __init__(self, workdir: Path, port: int | None = None):
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        super().__init__(workdir, port)


class WorkerProcess:
    """``python -m worker`` in a subprocess with the given ``LDD_*`` environment."""

    def __init__(self, env: dict[str, str], log: Path):
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        path = os.pathsep.join(p for p in (self.env.get("PYTHONPATH") or os.environ.get("PYTHONPATH"), str(ROOT)) if p)
        env = {**os.environ, **self.env, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "worker"], cwd=self.log.parent, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)  # fmt: skip
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL the worker's main process only, as the OOM killer or a lost machine would."""
        servers.kill(self.proc)

    def kill_all(self) -> None:
        """SIGKILL the worker and wait until its pool and training children are gone too (they die
        with their parent); quicker than a warm shutdown, for test teardown."""
        if self.proc is None:
            return
        family = descendants(self.proc.pid)
        self.kill()
        wait_for(lambda: not any(pid_alive(p) for p in family), 15, "the worker's children to exit")

    def stop(self) -> None:
        servers.terminate(self.proc, 15)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


# -- the worker service as the lifecycle tests use it -------------------------------------------------

IMAGE_SIZE = (128, 96)
DATASET = "ds_00000000000005e1"  # the synthetic data set every Service has (ids look like the store's)


def train_spec(dataset: str, epochs: int = 3, **schedule: Any) -> dict[str, Any]:
    return {
        "kind": "train", "name": "tiny", "dataset": dataset, "student": {"arch": "gfl_tiny"},
        "schedule": {"epochs": epochs, "batch_size": 4, "image_size": list(IMAGE_SIZE), "num_workers": 0,
                     "warmup_iters": 2, "lr": 0.01, **schedule},
        "seed": 0,
    }  # fmt: skip


class Service:
    """A data folder, a store and a broker shared by the worker processes a test starts."""

    def __init__(self, tmp: Path, broker_url: str, dataset_dir: Path, **env: str):
        self.tmp = tmp
        self.env = {
            "LDD_DATA_DIR": str(tmp / "ldd"), "LDD_BROKER_URL": broker_url, "LDD_LEASE_SECONDS": "3",
            "LDD_HEARTBEAT_SECONDS": "0.5", "LDD_PROGRESS_SECONDS": "0.5", "LDD_RECOVER_SECONDS": "1",
            "LDD_KILL_GRACE_SECONDS": "3", "LDD_MAX_ATTEMPTS": "3", **env,
        }  # fmt: skip
        self.settings = Settings.from_env(self.env)
        self.settings.make_dirs()
        self.store = Store(self.settings.store_url)
        (self.settings.datasets_dir / DATASET).symlink_to(dataset_dir.absolute(), target_is_directory=True)
        self.store.add_dataset(DATASET, "synthetic", f"datasets/{DATASET}", ["0", "1"], 20, 0, {}, [])
        self.workers: list[WorkerProcess] = []

    def start_worker(self) -> WorkerProcess:
        w = WorkerProcess(self.env, self.tmp / f"worker{len(self.workers)}.log").start()
        self.workers.append(w)
        return w

    def submit(self, spec: dict[str, Any]) -> str:
        job, _ = self.store.create_job(spec)
        enqueue(job["id"], self.settings, spec=job["spec"])
        return job["id"]

    def job(self, job_id: str) -> dict[str, Any]:
        job = self.store.get_job(job_id)
        assert job is not None
        return job

    def wait_end(self, job_id: str, timeout: float) -> dict[str, Any]:
        try:
            wait_for(lambda: self.job(job_id)["state"] in TERMINAL_STATES, timeout, f"job {job_id} to end", 0.2)
        except TimeoutError:
            raise AssertionError(f"{self.job(job_id)}\n{self.logs()}") from None
        return self.job(job_id)

    def progress_lines(self, job_id: str) -> list[dict[str, Any]]:
        path = self.settings.run_dir(job_id) / "progress.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait_training(self, job_id: str, min_iter: int, timeout: float = 60) -> dict[str, Any]:
        """Until the job's training child has reported at least ``min_iter`` iterations."""

        def progressed() -> dict[str, Any] | None:
            path = self.settings.run_dir(job_id) / "progress.json"
            try:
                p = json.loads(path.read_text())
            except (OSError, ValueError):
                return None
            return p if p.get("phase") == "train" and p.get("iter", 0) >= min_iter else None

        try:
            return wait_for(progressed, timeout, f"job {job_id} to train {min_iter} iterations", 0.05)
        except TimeoutError:
            raise AssertionError(f"{self.job(job_id)}\n{self.logs()}") from None

    def logs(self) -> str:
        return "\n".join(f"--- {w.log.name}\n{w.log_tail()}" for w in self.workers)

    def close(self) -> None:
        for w in self.workers:
            w.kill_all()
        self.store.close()


def training_children(worker: WorkerProcess) -> list[int]:
    """Pids of the ``python -m distill train`` processes under a worker."""
    out = []
    for pid in descendants(worker.pid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"distill" in cmd and b"train" in cmd:
            out.append(pid)
    return out

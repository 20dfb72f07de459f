"""``ldd up`` supervises its worker (issue 15): the real command (uvicorn API + ``python -m worker`` on the
embedded filesystem broker and SQLite), a real training job, SIGKILL of the worker process as the OOM killer
would. The API answers throughout, ``/readyz`` is not ready while the worker restarts, the job resumes and
publishes one model; a worker that keeps dying is left down and ``/readyz`` says why."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.supervisor import status_path
from bench.servers import free_port, terminate
from core.store import Store
from tests.service_fixtures import DATASET, IMAGE_SIZE, pid_alive, train_spec, wait_for

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(420)


class Up:
    """``python -m api.cli up`` on a free port over ``data_dir``."""

    def __init__(self, data_dir: Path, log: Path):
        self.data_dir, self.log, self.port = data_dir, log, free_port()
        env = {**os.environ, "LDD_DATA_DIR": str(data_dir), "LDD_LEASE_SECONDS": "3", "LDD_HEARTBEAT_SECONDS": "0.5",
               "LDD_PROGRESS_SECONDS": "0.5", "LDD_RECOVER_SECONDS": "1", "LDD_KILL_GRACE_SECONDS": "3",
               "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}  # fmt: skip
        for k in ("LDD_BROKER_URL", "LDD_STORE_URL", "LDD_API_KEYS", "LDD_ADMIN_KEYS"):
            env.pop(k, None)
        with open(log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "api.cli", "up", "--port", str(self.port)], cwd=ROOT,
                                         env=env, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}"
        wait_for(self._answers, 90, "ldd up's API")

    def _answers(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text()
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def status(self) -> dict[str, Any]:
        return json.loads(status_path(self.data_dir).read_text())

    def worker_pid(self, other_than: int | None = None) -> int:
        def up() -> int | None:
            s = self.status()
            return s["worker_pid"] if s["worker"] == "up" and s["worker_pid"] != other_than else None

        return wait_for(up, 60, "the supervisor to (re)start the worker")

    def stop(self) -> None:
        terminate(self.proc, 30)


class Watcher(threading.Thread):
    """Polls /healthz, /readyz and a job's page every 0.2 s: what the API answered, in order."""

    def __init__(self, url: str):
        super().__init__(daemon=True)
        self.url, self.done = url, threading.Event()
        self.failures: list[str] = []
        self.ready: list[tuple[int, str]] = []
        self.job_id: str | None = None

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as http:
            while not self.done.is_set():
                try:
                    if http.get("/healthz").status_code != 200:
                        self.failures.append("healthz")
                    if self.job_id and http.get(f"/v1/jobs/{self.job_id}").status_code != 200:
                        self.failures.append("job")
                    r = http.get("/readyz")
                    self.ready.append((r.status_code, r.json()["checks"].get("worker", "")))
                except httpx.TransportError as e:
                    self.failures.append(repr(e))
                time.sleep(0.2)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    service = Up(tmp_path / "ldd", tmp_path / "up.log")
    yield service
    service.stop()


def test_killed_worker_is_restarted_while_the_api_answers_and_the_job_resumes(tmp_path: Path, up: Up) -> None:
    from distill.data.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "syn", num_train=16, num_val=4, image_size=IMAGE_SIZE, num_classes=2, seed=0)
    store = Store(f"sqlite:///{up.data_dir / 'ldd.db'}")
    (up.data_dir / "datasets").mkdir(parents=True, exist_ok=True)
    (up.data_dir / "datasets" / DATASET).symlink_to(Path(data).absolute(), target_is_directory=True)
    store.add_dataset(DATASET, "synthetic", f"datasets/{DATASET}", ["0", "1"], 20, 0, {}, [])
    watcher = Watcher(up.url)
    try:
        r = httpx.post(up.url + "/v1/jobs", json=train_spec(DATASET, epochs=3), timeout=30)
        assert r.status_code == 202, r.text
        job_id = watcher.job_id = r.json()["id"]
        watcher.start()
        first = up.worker_pid()
        run = up.data_dir / "runs" / job_id

        def past_epoch_one() -> bool:
            try:
                p = json.loads((run / "progress.json").read_text())
            except (OSError, ValueError):
                return False
            return p.get("phase") == "train" and p.get("epoch", 0) >= 2 and (run / "checkpoints" / "last.pt").is_file()

        wait_for(past_epoch_one, 180, "the job to train past its first epoch", 0.1)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: up.status()["worker"] != "up", 10, "the supervisor to see the worker die")
        assert "killed by signal 9" in up.status()["reason"]
        second = up.worker_pid(other_than=first)
        assert not pid_alive(first)

        job = wait_for(lambda: (j := store.get_job(job_id)) and j["state"] in ("succeeded", "failed") and j, 300,
                       "the job to end", 0.5)  # fmt: skip
        assert job["state"] == "succeeded" and job["attempts"] == 2, (job, (tmp_path / "up.log").read_text()[-4000:])
        assert [m["job_id"] for m in store.list_models()] == [job_id]
        assert up.status()["worker_pid"] == second
    finally:
        watcher.done.set()
        store.close()
    watcher.join(10)
    assert watcher.failures == []
    codes = [code for code, _ in watcher.ready]
    down = [i for i, (code, worker) in enumerate(watcher.ready) if code == 503 and worker.startswith("restarting")]
    assert down, watcher.ready
    assert 200 in codes[: down[0]] and 200 in codes[down[-1] :], watcher.ready  # ready, not ready, ready again


def test_a_worker_that_keeps_dying_is_left_down_and_readyz_says_why(up: Up) -> None:
    pid = None
    for _ in range(5):
        pid = up.worker_pid(other_than=pid)
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: up.status()["worker"] == "down", 30, "the supervisor to give up")
    time.sleep(2.5)  # more than the backoff after a first death: nothing is restarted
    status = up.status()
    assert status["worker"] == "down" and status["worker_pid"] == pid and not pid_alive(pid)
    r = httpx.get(up.url + "/readyz", timeout=10)
    assert r.status_code == 503
    assert r.json()["checks"]["worker"].startswith("down: the worker died 5 times in 120 s (last: killed by signal 9)")
    assert httpx.get(up.url + "/v1/jobs", timeout=10).status_code == 200  # the API still serves
    up.stop()
    assert up.proc.returncode == 0 and not status_path(up.data_dir).exists()

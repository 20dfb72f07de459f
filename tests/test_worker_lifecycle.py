"""The job lifecycle with real processes: ``python -m worker`` subprocesses (Celery, prefork ``-c 1``)
on a private redis-server or the embedded filesystem broker, the SQLite store, and real training
children (``python -m distill train`` on gfl_tiny and a few small synthetic images), ONNX export and
the model registry.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.service_fixtures import (
    DATASET,
    IMAGE_SIZE,
    RedisServer,
    Service,
    WorkerProcess,
    pid_alive,
    postgres_database,
    train_spec,
    training_children,
    wait_for,
)

pytestmark = pytest.mark.timeout(420)  # a hung worker must fail the test, not the whole CI run


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    from distill.data.synthetic import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("synthetic"), num_train=16, num_val=4, image_size=IMAGE_SIZE,
                          num_classes=2, seed=0)  # fmt: skip


@pytest.fixture
def service(tmp_path, dataset_dir) -> Iterator[Service]:
    """The embedded setup of ``ldd up``: filesystem broker, SQLite store."""
    svc = Service(tmp_path, "filesystem://", dataset_dir)
    yield svc
    svc.close()


def kill_after_first_epoch(service: Service, worker: WorkerProcess, job_id: str) -> int:
    """SIGKILL ``worker`` once epoch 1 of the job is checkpointed; its training child must die with it.
    Returns the iterations per epoch."""
    first = service.wait_training(job_id, min_iter=1)
    per_epoch = first["total_iters"] // first["epochs"]
    # The relay into the store is throttled (progress_seconds), so the store may lag the file by that much.
    wait_for(lambda: ((service.job(job_id).get("progress") or {}).get("iter") or 0) >= 1,
             4 * service.settings.progress_seconds + 5, "progress to be relayed into the store")  # fmt: skip
    service.wait_training(job_id, min_iter=per_epoch + 1)
    assert (service.settings.run_dir(job_id) / "checkpoints" / "last.pt").is_file()
    children = training_children(worker)
    assert len(children) == 1, service.logs()
    running = service.job(job_id)
    assert running["state"] == "running" and running["attempts"] == 1

    worker.kill()  # the main process only: the pool child and the training child must follow it
    wait_for(lambda: not any(pid_alive(p) for p in children), 10, "the orphaned training child to die")
    return per_epoch


def check_resumed_and_published_once(service: Service, job: dict[str, Any], per_epoch: int) -> None:
    assert job["state"] == "succeeded", f"{job}\n{service.logs()}"
    assert job["attempts"] == 2 and job["model_id"] and "stopped heartbeating" in job["last_error"]
    assert job["metrics"]["bbox"]["AP"] >= 0 and job["progress"]["phase"] == "done"

    lines = service.progress_lines(job["id"])
    resumed = [ln for ln in lines if ln.get("resumed_from_iter")]
    assert resumed, "the second attempt did not resume from the checkpoint"
    start = resumed[0]["resumed_from_iter"]
    assert start >= per_epoch  # the first epoch is not trained again ...
    after = lines[lines.index(resumed[0]) :]
    assert all(ln["iter"] >= start for ln in after)  # ... and nothing before the checkpoint either

    models = service.store.list_models()
    assert [m["job_id"] for m in models] == [job["id"]] and models[0]["id"] == job["model_id"]
    published = [p for p in service.settings.models_dir.iterdir() if not p.name.startswith(".")]
    assert [p.name for p in published] == [job["model_id"]]
    assert (published[0] / "model.onnx").is_file()


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint_and_publishes_once(service: Service):
    """Embedded broker: SIGKILL the worker mid-training; the lease expires, the job is queued again and
    a new worker resumes it from the epoch checkpoint, exports and publishes exactly one model."""
    w1 = service.start_worker()
    job_id = service.submit(train_spec(DATASET, epochs=3))
    per_epoch = kill_after_first_epoch(service, w1, job_id)
    w2 = service.start_worker()
    check_resumed_and_published_once(service, service.wait_end(job_id, timeout=180), per_epoch)
    assert training_children(w2) == []


@pytest.mark.slow
def test_redis_worker_killed_and_redis_restarted(tmp_path, dataset_dir):
    """Production pairing (Redis broker, PostgreSQL store). The worker is SIGKILLed mid-training and
    the job resumes on a new worker; while it trains there, Redis (no persistence) restarts, losing
    the message of a job queued behind it. The running job still finishes and publishes once; the
    lost message is re-sent from the store and the reconnected worker starts that job, which is then
    cancelled (state ``cancelled`` within 10 s, its training child gone)."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    with postgres_database() as store_url:
        service = Service(tmp_path, redis.url, dataset_dir, LDD_STORE_URL=store_url)
        try:
            w1 = service.start_worker()
            first = service.submit(train_spec(DATASET, epochs=3))
            per_epoch = kill_after_first_epoch(service, w1, first)
            w2 = service.start_worker()
            wait_for(lambda: service.job(first)["attempts"] == 2, 30, "the job to be claimed again")
            service.wait_training(first, min_iter=per_epoch + 1)
            second = service.submit(train_spec(DATASET, epochs=50))
            redis.stop()  # the second job's message is lost with it
            time.sleep(1)
            redis.start()
            check_resumed_and_published_once(service, service.wait_end(first, timeout=180), per_epoch)

            service.wait_training(second, min_iter=1, timeout=60)
            assert f"re-sent lost broker messages for {second}" in w2.log.read_text()
            children = training_children(w2)
            assert len(children) == 1
            t0 = time.monotonic()
            service.store.request_cancel(second)
            b = service.wait_end(second, timeout=10)
            assert b["state"] == "cancelled" and b["attempts"] == 1 and time.monotonic() - t0 < 10
            assert not any(pid_alive(p) for p in children)
        finally:
            service.close()
            redis.stop()


def test_cancel_running_job(service: Service):
    w = service.start_worker()
    job_id = service.submit(train_spec(DATASET, epochs=50))
    service.wait_training(job_id, min_iter=1)
    children = training_children(w)
    assert len(children) == 1
    t0 = time.monotonic()
    assert service.store.request_cancel(job_id)["cancel_requested"]
    job = service.wait_end(job_id, timeout=10)
    assert job["state"] == "cancelled" and time.monotonic() - t0 < 10
    assert not [p for p in children if pid_alive(p)], f"{job}\n{service.logs()}"
    assert training_children(w) == []
    assert w.proc.poll() is None  # the worker itself goes on
    assert service.store.list_models() == []


def test_max_attempts_exceeded(service: Service):
    """With one attempt allowed, a worker lost mid-job fails the job with the reason."""
    service.env["LDD_MAX_ATTEMPTS"] = "1"
    w1 = service.start_worker()
    job_id = service.submit(train_spec(DATASET, epochs=50))
    service.wait_training(job_id, min_iter=1)
    w1.kill()
    service.start_worker()
    job = service.wait_end(job_id, timeout=30)
    assert job["state"] == "failed" and job["attempts"] == 1
    assert "gave up after 1 attempt" in job["error"] and "stopped heartbeating" in job["error"]
    assert service.store.list_models() == []


def test_training_failure_fails_with_the_childs_reason(service: Service, tmp_path):
    """A job the training program refuses (a teacher whose edge distributions have other bins than the
    student's) fails at once with the program's own message from error.json, without retries. A teacher
    whose facts the store knows is refused by the worker's job check itself, before any child starts."""
    from distill.checkpoint import atomic_save, detector_state
    from distill.models.gfl import GFL, DetectorConfig
    from distill.spec import arch_config

    cfg = DetectorConfig(**{**arch_config("gfl_tiny"), "reg_max": 8}, num_classes=2, classes=["0", "1"])
    for ck in ("ck_0000000000000001", "ck_0000000000000002"):
        atomic_save(detector_state(GFL(cfg, "gfl_tiny")), service.settings.checkpoints_dir / f"{ck}.pt")
    service.store.add_checkpoint("ck_0000000000000001", "checkpoints/ck_0000000000000001.pt", {},
                                 "facts unknown to the store")  # fmt: skip
    service.store.add_checkpoint("ck_0000000000000002", "checkpoints/ck_0000000000000002.pt",
                                 {"kind": "detector", "reg_max": 8}, "facts known")  # fmt: skip
    distill = {**train_spec(DATASET, epochs=1), "kind": "distill"}

    service.start_worker()
    refused = service.submit({**distill, "teacher": {"checkpoint": "ck_0000000000000002"}})
    failed = service.submit({**distill, "teacher": {"checkpoint": "ck_0000000000000001"}})
    job = service.wait_end(refused, timeout=30)
    assert job["state"] == "failed" and job["error"].startswith("teacher does not match the student: reg_max 8")
    assert not (service.settings.run_dir(refused) / "train.log").exists()  # no training child ran

    job = service.wait_end(failed, timeout=90)
    assert job["state"] == "failed" and job["attempts"] == 1, job
    error = json.loads((service.settings.run_dir(failed) / "error.json").read_text())["error"]
    assert job["error"].startswith(error) and "reg_max 8 differs" in error
    assert job["error"].endswith("(a failure of the job itself: not retried)")


@pytest.mark.slow
def test_training_child_killed_from_outside_is_retried(service: Service):
    """The OOM killer takes the training child (not the worker): the attempt is retried from the last checkpoint
    and the job succeeds on its second attempt, one model published."""
    worker = service.start_worker()
    # Four epochs: the kill must land after epoch 1's checkpoint and before training ends, a window of three
    # epochs (with two, a fast machine finished epoch 2 between two polls and the job was never killed).
    job_id = service.submit(train_spec(DATASET, epochs=4))
    first = service.wait_training(job_id, min_iter=1)
    service.wait_training(job_id, min_iter=first["total_iters"] // first["epochs"] + 1)
    children = training_children(worker)
    assert len(children) == 1, service.logs()
    os.kill(children[0], signal.SIGKILL)
    job = service.wait_end(job_id, timeout=180)
    assert job["state"] == "succeeded" and job["attempts"] == 2, job
    assert [m["job_id"] for m in service.store.list_models()] == [job_id]


def test_worker_stop_gives_the_job_back(service: Service):
    """SIGTERM to the worker's main process (``docker stop``): the training child checkpoints and
    exits, the job is queued again at once without using up an attempt, and the worker exits."""
    service.env["LDD_KILL_GRACE_SECONDS"] = "30"  # time to finish the iteration and checkpoint, on a busy CPU
    w = service.start_worker()
    job_id = service.submit(train_spec(DATASET, epochs=50))
    service.wait_training(job_id, min_iter=1)
    children = training_children(w)
    assert len(children) == 1
    w.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: service.job(job_id)["state"] == "queued", 40, "the job to be given back")
    job = service.job(job_id)
    assert job["attempts"] == 0 and job["lease_owner"] is None and "shut down" in job["last_error"]
    assert w.proc.wait(30) == 0 and not any(pid_alive(p) for p in children)
    assert (service.settings.run_dir(job_id) / "checkpoints" / "last.pt").is_file()  # written on SIGTERM
    assert service.store.request_cancel(job_id)["state"] == "cancelled"

"""Jobs routed by size (``core.routing``): a job of ``schedule.gpus`` = N waits in queue ``gpu`` (N = 1) or
``gpu.N`` for a worker with at least N slots. Real ``python -m worker`` processes on the embedded filesystem
broker and on a private redis-server, the SQLite store.

The jobs name a dataset the store lacks, so an attempt ends at its check, at once: which worker claims which
job, and when, is all these tests look at (training a job on several processes is ``tests/test_ddp.py``).
"""

from __future__ import annotations

import stat
from collections.abc import Iterator
from typing import Any

import pytest

from core.queue import enqueue, queue_depths
from core.routing import job_processes, queue_for, visible_gpus, worker_queues, worker_slots
from core.settings import Settings
from core.store import TERMINAL_STATES, Store
from tests.service_fixtures import RedisServer, Service, WorkerProcess, train_spec, wait_for
from tests.test_worker_units import broker_settings  # noqa: F401  (a fixture: the embedded broker and Redis)
from worker.main import worker_argv
from worker.recovery import recover

pytestmark = pytest.mark.timeout(300)

UNKNOWN_DATASET = "ds_0000000000000bad"  # not in the store: every attempt fails its check at once
QUEUES = ("gpu", "gpu.2")


def job_spec(gpus: int) -> dict[str, Any]:
    return train_spec(UNKNOWN_DATASET, epochs=1, gpus=gpus)  # batch 4 splits over 1 or 2 processes


def test_a_spec_picks_its_queue_and_a_worker_takes_the_sizes_it_can_run():
    assert [queue_for(job_spec(n)) for n in (1, 2, 8)] == ["gpu", "gpu.2", "gpu.8"]
    assert queue_for({"kind": "export", "job_id": "job_1"}) == "gpu" and job_processes({"schedule": {}}) == 1
    assert worker_queues(1) == ["gpu"] and worker_queues(3) == ["gpu", "gpu.2", "gpu.3"]
    assert worker_argv(3)[worker_argv(3).index("--queues") + 1] == "gpu,gpu.2,gpu.3"
    assert Settings.from_env({"LDD_WORKER_GPUS": "4"}).worker_gpus == 4
    four = Settings(worker_gpus=4)
    assert worker_slots(four) == 4 and Settings.from_env(four.to_env()) == four  # what a worker's children see
    assert Settings.from_env({}).worker_gpus == 0 and worker_slots(Settings()) >= 1  # 0: detected


@pytest.mark.parametrize(("visible", "gpus"), [("0,1", 2), ("3", 1), ("", 0), ("-1", 0), ("0,-1,2", 1)])
def test_visible_gpus_follow_cuda_visible_devices(monkeypatch, visible, gpus):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert visible_gpus() == gpus


def test_visible_gpus_count_the_gpus_nvidia_smi_lists(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert visible_gpus() == 0  # no driver: a CPU worker
    tool = tmp_path / "nvidia-smi"
    listing = ["GPU 0: NVIDIA H200 (UUID: GPU-1)", "  MIG 3g.71gb     Device  0: (UUID: MIG-2)",
               "GPU 1: NVIDIA H200 (UUID: GPU-3)"]  # fmt: skip
    tool.write_text("#!/bin/sh\n" + "".join(f"echo '{line}'\n" for line in listing))
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    assert visible_gpus() == 2


@pytest.fixture(params=["filesystem", "redis"])
def service(request, tmp_path) -> Iterator[Service]:
    redis = None
    if request.param == "redis":
        redis = RedisServer(tmp_path / "redis")
        redis.start()
    # A lease of 60 s: nothing counts as lost while the test runs, so no message is re-sent behind its back.
    svc = Service(tmp_path, redis.url if redis else "filesystem://", tmp_path, LDD_LEASE_SECONDS="60")
    yield svc
    svc.close()
    if redis is not None:
        redis.stop()


def start_worker(service: Service, slots: int, **env: str) -> WorkerProcess:
    worker = WorkerProcess({**service.env, "LDD_WORKER_GPUS": str(slots), **env},
                           service.tmp / f"worker{len(service.workers)}-{slots}slots.log").start()  # fmt: skip
    service.workers.append(worker)  # service.close() kills it
    return worker


def ran(worker: WorkerProcess, job_id: str) -> bool:
    return f"job {job_id}: attempt 1 by" in worker.log.read_text(errors="replace")


def test_jobs_wait_for_a_worker_with_enough_slots(service):
    """A 1-slot worker runs the 1-process job and leaves both 2-process jobs queued (one sent by an earlier
    version to queue ``gpu``: it sends that one on to ``gpu.2``); a 2-slot worker then runs them."""
    s = service.settings
    routed, _ = service.store.create_job(job_spec(2))
    assert enqueue(routed["id"], s, spec=routed["spec"])
    legacy, _ = service.store.create_job(job_spec(2))
    assert enqueue(legacy["id"], s)  # no spec: queue gpu, as every message was before routing
    small, _ = service.store.create_job(job_spec(1))
    assert enqueue(small["id"], s, spec=small["spec"])
    assert queue_depths(QUEUES, s) == {"gpu": 2, "gpu.2": 1}

    # The 2-process jobs are ahead of the 1-process one in queue gpu's order: had the 1-slot worker claimed
    # them, it would have done so before it claimed the 1-process job. Its watchdog must not take the messages
    # waiting in gpu.2 for a stuck consumer of its own (a restart every 3 s).
    one_slot = start_worker(service, 1, LDD_CONSUMER_STALL_SECONDS="3")
    wait_for(lambda: service.job(small["id"])["state"] in TERMINAL_STATES, 90, "the 1-process job to run")
    wait_for(lambda: queue_depths(QUEUES, s) == {"gpu": 0, "gpu.2": 2}, 30, "the legacy message sent on to gpu.2")
    for job in (routed, legacy):
        now = service.job(job["id"])
        assert now["state"] == "queued" and now["attempts"] == 0, f"{now}\n{service.logs()}"
    assert ran(one_slot, small["id"]), service.logs()

    two_slots = start_worker(service, 2)
    for job in (routed, legacy):
        ended = service.wait_end(job["id"], timeout=90)
        assert ended["attempts"] == 1 and UNKNOWN_DATASET in ended["error"], ended
        assert ran(two_slots, job["id"]) and not ran(one_slot, job["id"]), service.logs()
    assert queue_depths(QUEUES, s) == {"gpu": 0, "gpu.2": 0}
    assert "restarting it" not in one_slot.log.read_text(errors="replace"), service.logs()


def test_recovery_resends_a_lost_message_to_the_jobs_queue(broker_settings):  # noqa: F811
    s = broker_settings.model_copy(update={"lease_seconds": 0.0})  # every queued job has waited long enough
    store = Store(s.store_url)
    one, _ = store.create_job(job_spec(1))
    assert enqueue(one["id"], s, spec=one["spec"])
    two, _ = store.create_job(job_spec(2))  # its message was never sent (lost)
    # One message is missing, and it is gpu.2's: counted over all queues, the oldest job (one) would get it.
    assert wait_for(lambda: recover(store, s)["resent"], 10, "a lost message to be re-sent") == [two["id"]]
    assert queue_depths(QUEUES, s) == {"gpu": 1, "gpu.2": 1}
    assert recover(store, s)["resent"] == []  # each queue holds a message per queued job of its size

    # A 2-process job whose worker stopped heartbeating is queued again, and its message goes to gpu.2.
    assert store.claim(two["id"], "dead-worker", lease_seconds=0.0)
    assert wait_for(lambda: recover(store, s)["requeued"], 10, "the expired lease") == [two["id"]]
    assert queue_depths(QUEUES, s) == {"gpu": 1, "gpu.2": 2}
    store.close()

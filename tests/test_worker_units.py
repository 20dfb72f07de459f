"""Fast worker tests without a worker process: settings, and the
recovery pass against real brokers (the embedded filesystem transport and a private redis-server)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.service_fixtures import RedisServer
from worker.queue import broker_ok, enqueue, queue_depth
from worker.recovery import recover
from worker.settings import Settings
from worker.store import Store


def test_settings_from_env(tmp_path):
    s = Settings.from_env({"LDD_DATA_DIR": str(tmp_path), "LDD_API_KEYS": "a, b,", "LDD_MAX_IMAGE_PIXELS": "40e6",
                           "LDD_LEASE_SECONDS": "5", "LDD_MAX_ATTEMPTS": "2"})  # fmt: skip
    assert s.data_dir == tmp_path and s.api_keys == ["a", "b"] and s.max_image_pixels == 40_000_000
    assert s.store_url == f"sqlite:///{tmp_path / 'ldd.db'}" and s.embedded_broker
    assert s.lease_seconds == 5.0 and s.max_attempts == 2 and s.recover_seconds == 2.5
    assert s.models_dir == tmp_path / "models" and s.run_dir("job_1") == tmp_path / "runs" / "job_1"
    d = Settings.from_env({})
    assert d.data_dir == Path(".ldd").absolute() and d.max_upload_bytes == 500 * 1024 * 1024
    assert d.api_keys == [] and d.max_attempts == 3 and d.heartbeat_seconds == 10
    assert Settings.from_env(s.to_env()) == s  # what a child process rebuilds


@pytest.fixture(params=["embedded", "redis"])
def broker_settings(request, tmp_path):
    if request.param == "embedded":
        yield Settings(data_dir=tmp_path / "ldd", lease_seconds=0.3)
        return
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    yield Settings(data_dir=tmp_path / "ldd", broker_url=redis.url, lease_seconds=0.3)
    redis.stop()


def test_recovery_resends_lost_messages_and_requeues_expired(broker_settings):
    s = broker_settings
    store = Store(s.store_url)
    assert broker_ok(s) and queue_depth(s) == 0
    a, _ = store.create_job({"kind": "train", "dataset": "ds_1"})  # its message was never sent (lost)
    b, _ = store.create_job({"kind": "train", "dataset": "ds_1"})
    assert enqueue(b["id"], s) and queue_depth(s) == 1
    assert recover(store, s) == {"requeued": [], "resent": []}  # both too recent to call lost
    time.sleep(0.4)
    out = recover(store, s)
    assert out["requeued"] == [] and len(out["resent"]) == 1 and queue_depth(s) == 2
    time.sleep(0.4)
    assert recover(store, s)["resent"] == []  # the broker holds as many messages as there are queued jobs

    # A job whose worker stopped heartbeating is queued again and its message re-sent.
    store.claim(a["id"], "dead-worker", lease_seconds=0.2)
    time.sleep(0.3)
    assert recover(store, s)["requeued"] == [a["id"]]
    assert store.get_job(a["id"])["state"] == "queued" and queue_depth(s) == 3
    store.close()


def test_enqueue_with_broker_down_is_not_fatal(tmp_path):
    from tests.service_fixtures import free_port

    s = Settings(data_dir=tmp_path, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    t0 = time.monotonic()
    assert enqueue("job_x", s) is False and queue_depth(s) is None and not broker_ok(s)
    assert time.monotonic() - t0 < 30


def test_worker_modules_import_without_torch():
    """The API imports the store and the queue, and the worker's main process runs the lifecycle:
    none of them may pull in torch (training and export happen in child processes)."""
    import subprocess
    import sys

    code = (
        "import sys; import worker.store, worker.queue, worker.settings, worker.jobs, worker.recovery, "
        "worker.checks, worker.main; bad = [m for m in ('torch', 'torchvision', 'onnx') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])

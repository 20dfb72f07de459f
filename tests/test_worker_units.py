"""Fast worker tests without a worker process: settings, publishing into the registry and the store's
catalogue, the recovery pass against real brokers (the embedded filesystem transport and a private
redis-server), and what a worker process loads."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.artifacts import Artifacts
from core.queue import broker_ok, enqueue, queue_depth
from core.settings import Settings
from core.store import Store
from deploy.registry import RUNTIME_KEYS, read_model_json
from tests.service_fixtures import RedisServer
from tests.test_deploy_registry import make_export
from worker.publish import publish_model
from worker.recovery import recover

ROOT = Path(__file__).resolve().parents[1]


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
    assert d.weights_dir is None and d.to_env()["LDD_WEIGHTS_DIR"] == ""
    w = Settings.from_env({"LDD_WEIGHTS_DIR": "w", "LDD_API_KEYS": "alice:k1"})
    assert w.weights_dir == Path("w").absolute() and w.api_keys == ["alice:k1"]
    assert Settings.from_env(w.to_env()) == w
    assert Settings.from_env({"LDD_MAX_ATTEMPTS": "5"}, max_attempts=1).max_attempts == 1  # overrides win
    with pytest.raises(ValidationError, match="lease_seconds"):
        Settings.from_env({"LDD_LEASE_SECONDS": "soon"})


def test_settings_read_the_process_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LDD_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LDD_API_KEYS", "a,b")
    monkeypatch.setenv("LDD_HEARTBEAT_SECONDS", "")  # empty = unset
    for s in (Settings(), Settings.from_env()):
        assert s.data_dir == tmp_path and s.api_keys == ["a", "b"] and s.heartbeat_seconds == 10
    assert Settings(api_keys=[]).api_keys == []  # arguments win over the environment
    assert Settings.from_env({}).data_dir == Path(".ldd").absolute()  # an explicit env is all there is


def test_publish_model_files_for_the_runtime_description_in_the_store(tmp_path):
    """The registry folder gets model.json's runtime keys only; the store's row gets the description.
    Publishing again (an attempt that died between the two steps) records the model already published."""
    store = Store(f"sqlite:///{tmp_path / 'ldd.db'}")
    artifacts = Artifacts(Settings(data_dir=tmp_path / "ldd"))
    export = make_export(tmp_path / "export", 1.0)
    description = {**read_model_json(export), "arch": "gfl_tiny", "export": {"reg_max": 16}, "graph": {"nodes": 1}}
    row = publish_model(store, artifacts, export, description, model_id="mdl_a", job_id="job_a", name="n",
                        metrics={"AP": 0.5})  # fmt: skip
    on_disk = read_model_json(tmp_path / "ldd" / "models" / "mdl_a")
    # precision and cpu_features are written only for a format that needs them (bf16), not for fp32.
    assert set(on_disk) == set(RUNTIME_KEYS) - {"precision", "cpu_features"}
    assert row["key"] == "models/mdl_a"  # a storage key, never a path
    assert row["job_id"] == "job_a" and row["meta"]["arch"] == "gfl_tiny" and row["meta"]["metrics"] == {"AP": 0.5}
    assert row["meta"]["name"] == "n" and row["meta"]["sha256"] == on_disk["sha256"] and row["meta"]["id"] == "mdl_a"
    assert store.get_model("mdl_a") == row
    again = publish_model(store, artifacts, export, description, model_id="mdl_a", job_id="job_a")
    assert again == row and [m["id"] for m in store.list_models()] == ["mdl_a"]
    store.close()


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
    assert recover(store, s) == {"requeued": [], "resent": [], "studies_finished": []}  # both too recent to call lost
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
    from bench.servers import free_port

    s = Settings(data_dir=tmp_path, broker_url=f"redis://127.0.0.1:{free_port()}/0")
    t0 = time.monotonic()
    assert enqueue("job_x", s) is False and queue_depth(s) is None and not broker_ok(s)
    assert time.monotonic() - t0 < 30


def test_worker_modules_import_without_torch():
    """The API imports the store and the queue, and the worker's main process runs the lifecycle:
    none of them may pull in torch (training and export happen in child processes)."""
    code = (
        "import sys; import core.store, core.queue, core.settings, worker.jobs, worker.recovery, "
        "core.checks, worker.main, worker.tasks, worker.hooks, worker.publish, worker.process; "
        "bad = [m for m in ('torch', 'torchvision', 'onnx') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_a_worker_app_loads_the_task_and_its_hooks(tmp_path):
    """What ``celery -A core.celery_app worker`` (and ``python -m worker``) does at start: the app's
    ``include`` brings in the task and the hooks on the worker's signals; the API's import does not."""
    code = (
        "import json, sys; from celery import signals; from core.celery_app import TASK_RUN_JOB, app; "
        "before = TASK_RUN_JOB in app.tasks or 'worker.tasks' in sys.modules; app.loader.import_default_modules(); "
        "hooks = [getattr(r[1], '__name__', '') for r in signals.worker_ready.receivers "
        "+ signals.worker_shutting_down.receivers]; "
        "print(json.dumps([before, TASK_RUN_JOB in app.tasks, hooks]))"
    )
    env = {"PATH": "/usr/bin:/bin", "LDD_DATA_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    before, registered, hooks = json.loads(out.stdout)
    assert not before and registered and {"start_recovery", "forward_warm_shutdown"} <= set(hooks)


def test_consumer_watchdog_decides_stuck_only_when_idle_with_messages_waiting():
    from worker.hooks import consumer_stalled

    assert consumer_stalled(busy=True, waiting=3, stalled_since=None, now=100.0, limit_s=30) == (None, False)
    assert consumer_stalled(busy=False, waiting=0, stalled_since=90.0, now=100.0, limit_s=30) == (None, False)
    # The broker unreachable says nothing about the consumer: the count starts over.
    assert consumer_stalled(busy=False, waiting=None, stalled_since=90.0, now=100.0, limit_s=30) == (None, False)
    assert consumer_stalled(busy=False, waiting=2, stalled_since=None, now=100.0, limit_s=30) == (100.0, False)
    assert consumer_stalled(busy=False, waiting=2, stalled_since=100.0, now=129.0, limit_s=30) == (100.0, False)
    assert consumer_stalled(busy=False, waiting=2, stalled_since=100.0, now=130.0, limit_s=30) == (100.0, True)

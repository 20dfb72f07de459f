"""Fast worker tests without a worker process: settings, spec resolution and teacher checks, and the
recovery pass against real brokers (the embedded filesystem transport and a private redis-server)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.service_fixtures import RedisServer
from worker.queue import broker_ok, enqueue, queue_depth
from worker.recovery import recover
from worker.resolve import JobRefused, resolve_spec, teacher_mismatch
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


@pytest.fixture
def env(tmp_path):
    settings = Settings(data_dir=tmp_path / "ldd")
    settings.make_dirs()
    store = Store(settings.store_url)
    ds = settings.datasets_dir / "ds_1"
    ds.mkdir()
    store.add_dataset("ds_1", "d", str(ds), ["cat", "dog"], 3, 4, {"train": 2, "val": 1}, [])
    yield settings, store
    store.close()


def test_resolve_train_and_distill(env):
    settings, store = env
    local = resolve_spec({"kind": "train", "dataset": "ds_1", "student": {"arch": "gfl_tiny"}}, store, settings)
    assert local["dataset"] == str(settings.datasets_dir / "ds_1") and local["student"]["arch"] == "gfl_tiny"

    ckpt = settings.checkpoints_dir / "ck_1.pt"
    ckpt.write_bytes(b"weights")
    store.add_checkpoint("ck_1", str(ckpt), {"reg_max": 16, "strides": [8, 16, 32, 64, 128],
                                             "num_classes": 2, "classes": ["cat", "dog"]}, "t")  # fmt: skip
    spec = {"kind": "distill", "dataset": "ds_1", "teacher": {"checkpoint": "ck_1"}}
    local = resolve_spec(spec, store, settings)
    assert local["teacher"] == {"path": str(ckpt)}
    assert local["distill"]["tau"] > 0  # defaults filled in for the child

    # A teacher given by the job that trained it, and by the model that job published.
    job, _ = store.create_job({"kind": "train", "dataset": "ds_1"})
    store.claim(job["id"], "w", 30)
    run = settings.run_dir(job["id"])
    run.mkdir(parents=True)
    (run / "model.pt").write_bytes(b"weights")
    with pytest.raises(JobRefused, match="running, not succeeded"):
        resolve_spec({**spec, "teacher": {"job": job["id"]}}, store, settings)
    store.finish(job["id"], "w", "succeeded", model_id="mdl_x")
    store.add_model("mdl_x", job["id"], str(settings.models_dir / "mdl_x"), {"classes": ["cat", "dog"]})
    for teacher in ({"job": job["id"]}, {"model": "mdl_x"}):
        assert resolve_spec({**spec, "teacher": teacher}, store, settings)["teacher"]["path"] == str(run / "model.pt")


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"kind": "train", "dataset": "ds_nope"}, "unknown dataset 'ds_nope'"),
        ({"kind": "train", "dataset": "ds_1", "student": {"arch": "gfl_r999"}}, "unknown architecture"),
        ({"kind": "distill", "dataset": "ds_1", "teacher": {"model": "mdl_nope"}}, "unknown teacher model"),
        ({"kind": "distill", "dataset": "ds_1", "teacher": {"job": "job_nope"}}, "unknown teacher job"),
        ({"kind": "distill", "dataset": "ds_1", "teacher": {"checkpoint": "ck_no"}}, "unknown teacher checkpoint"),
        ({"kind": "distill", "dataset": "ds_1", "teacher": {"path": "/etc/passwd"}}, "for local runs"),
    ],
)
def test_resolve_refuses(env, spec, message):
    settings, store = env
    with pytest.raises(JobRefused, match=message):
        resolve_spec(spec, store, settings)


def test_teacher_mismatch():
    ok = {"reg_max": 16, "strides": [8, 16, 32, 64, 128], "num_classes": 2, "classes": ["cat", "dog"]}
    assert teacher_mismatch(ok, ["cat", "dog"]) is None
    assert teacher_mismatch({}, ["cat"]) is None  # nothing known: the training child decides
    assert "reg_max 7" in teacher_mismatch({**ok, "reg_max": 7}, ["cat", "dog"])
    assert "strides" in teacher_mismatch({**ok, "strides": [8, 16, 32]}, ["cat", "dog"])
    assert "classes" in teacher_mismatch(ok, ["cat", "bird"])
    assert "3 classes" in teacher_mismatch({"num_classes": 3}, ["cat", "dog"])
    assert "reg_max 8" in teacher_mismatch({"config": {"reg_max": 8}}, ["cat", "dog"])  # nested model.json


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
        "worker.resolve, worker.main; bad = [m for m in ('torch', 'torchvision', 'onnx') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])

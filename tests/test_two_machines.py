"""Two worker machines on one machine (issue 22): an API, two workers and no shared folder between any of them,
only PostgreSQL (the store), Redis (the broker) and an S3 server (moto's, over HTTP: the client code that talks to
MinIO or AWS). A distillation job's worker is SIGKILLed mid-training and its data folder deleted, as when a
machine vanishes; the other worker resumes the job from the checkpoint the first one uploaded, publishes exactly
one model to the bucket, and the API serves it from its own verified copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from bench.servers import s3_client, wait_for
from core.artifacts import MANIFEST
from core.storage import S3Storage
from tests.api_server import coco_zip, png_bytes, private_redis_url, serve_api
from tests.s3_server import make_bucket, moto_server, s3_env
from tests.service_fixtures import WorkerProcess, postgres_database

pytestmark = pytest.mark.slow

FAST_LEASES = {"LDD_LEASE_SECONDS": "4", "LDD_HEARTBEAT_SECONDS": "0.5", "LDD_PROGRESS_SECONDS": "0.5",
               "LDD_RECOVER_SECONDS": "1", "LDD_KILL_GRACE_SECONDS": "3", "LDD_MAX_ATTEMPTS": "3"}  # fmt: skip


def _teacher_file(path: Path) -> Path:
    from distill.checkpoint import atomic_save, build_detector, detector_state

    atomic_save(detector_state(build_detector("gfl_tiny", 2, ["a", "b"])), path)
    return path


def test_a_job_whose_machine_vanishes_resumes_on_another_and_is_served(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    with moto_server() as endpoint, postgres_database() as store_url:
        bucket = make_bucket(endpoint, "two-machines")
        env = {"LDD_STORE_URL": store_url, "LDD_BROKER_URL": private_redis_url(),
               "LDD_STORAGE_URL": f"s3://{bucket}/ldd", **s3_env(endpoint), **FAST_LEASES}  # fmt: skip
        storage = S3Storage(bucket, "ldd", client=s3_client(endpoint))
        api = serve_api(tmp_path / "api", **env)
        machines: dict[str, WorkerProcess] = {}
        try:
            with httpx.Client(base_url=api.url, timeout=60) as http:
                with open(coco_zip(tmp_path / "ds.zip", n=16, size=(128, 96)), "rb") as f:
                    ds = http.post("/v1/datasets", files={"file": ("ds.zip", f, "application/zip")})
                assert ds.status_code == 201, ds.text
                with open(_teacher_file(tmp_path / "teacher.pt"), "rb") as f:
                    ck = http.post("/v1/checkpoints", files={"file": ("teacher.pt", f)})
                assert ck.status_code == 201, ck.text
                assert http.get("/readyz").json()["checks"]["storage"] == "ok"
                # The API kept nothing in a folder a worker could read: the bucket has both.
                assert storage.exists(f"datasets/{ds.json()['id']}/{MANIFEST}")
                assert storage.exists(f"checkpoints/{ck.json()['id']}.pt")

                machines["a"] = _worker(env, tmp_path / "machine-a")
                spec = {"kind": "distill", "dataset": ds.json()["id"], "teacher": {"checkpoint": ck.json()["id"]},
                        "student": {"arch": "gfl_tiny"}, "schedule": {"epochs": 5, "batch_size": 4,
                        "image_size": [128, 96], "num_workers": 0, "warmup_iters": 2}}  # fmt: skip
                r = http.post("/v1/jobs", json=spec)
                assert r.status_code == 202, r.text
                job_id = r.json()["id"]
                # Machine a trains and uploads a checkpoint at the end of its first epoch; then it vanishes.
                checkpoint = f"runs/{job_id}/checkpoints/last.pt"
                wait_for(lambda: storage.exists(checkpoint), 180, "machine a to upload a checkpoint", 0.2)
                machines["a"].kill_all()
                shutil.rmtree(tmp_path / "machine-a" / "data")

                machines["b"] = _worker(env, tmp_path / "machine-b")
                try:
                    wait_for(lambda: http.get(f"/v1/jobs/{job_id}").json()["state"] in ("succeeded", "failed"),
                             300, "the job to end on machine b", 0.5)  # fmt: skip
                except TimeoutError:
                    raise AssertionError(_logs(machines, http.get(f"/v1/jobs/{job_id}").text)) from None
                job = http.get(f"/v1/jobs/{job_id}").json()
                assert job["state"] == "succeeded", _logs(machines, str(job))
                assert job["attempts"] == 2, job  # a's, and b's that finished it
                # b started from a's uploaded checkpoint (an epoch of 4 iterations at least), not from scratch.
                assert (job["progress"].get("resumed_from_iter") or 0) >= 4, job["progress"]
                assert f"job {job_id}: " in (b_log := machines["b"].log.read_text()) and "fetched from s3://" in b_log
                models = [m for m in http.get("/v1/models").json()["models"] if m["job_id"] == job_id]
                assert [m["format"] for m in models] == ["fp32"], models
                model_id = models[0]["id"]
                assert storage.exists(f"models/{model_id}/{MANIFEST}") and storage.exists(
                    f"models/{model_id}/model.onnx"
                )

                r = http.post(f"/v1/models/{model_id}/detect", files={"file": ("x.png", png_bytes((128, 96)))})
                assert r.status_code == 200, r.text
                assert isinstance(r.json()["detections"], list)
                # Served from the API's own verified copy; no machine's folder holds another's files.
                assert (tmp_path / "api" / "data" / "cache" / "models" / model_id / "model.onnx").is_file()
                assert not (tmp_path / "api" / "data" / "models").exists()
                assert not (tmp_path / "machine-b" / "data" / "datasets").exists()
        finally:
            for w in machines.values():
                w.kill_all()
            api.stop()


def _worker(env: dict[str, str], machine: Path) -> WorkerProcess:
    return WorkerProcess({**env, "LDD_DATA_DIR": str(machine / "data")}, machine / "worker.log").start()


def _logs(machines: dict[str, WorkerProcess], extra: str) -> str:
    return extra + "".join(f"\n--- machine {name}\n{w.log_tail()}" for name, w in machines.items())

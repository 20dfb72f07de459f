"""Deletion over real HTTP (a uvicorn subprocess without torch, SQLite, Redis as the broker, no worker: jobs stay
queued until cancelled): every kind of resource is deleted with its files, what still uses one is named in a
409, another tenant gets 404, and the storage usage in /metrics goes down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from tests.api_server import ApiServer, _metric, coco_zip, error_of, publish_test_model, serve_api

A, B = {"Authorization": "Bearer KA"}, {"Authorization": "Bearer KB"}
SCHEDULE = {"epochs": 1, "batch_size": 2, "image_size": [128, 96], "num_workers": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = serve_api(tmp_path_factory.mktemp("deletion"), LDD_API_KEYS="team-a:KA,team-b:KB")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server: ApiServer) -> Any:
    with httpx.Client(base_url=server.url, timeout=60, headers=A) as c:
        yield c


def row_path(server: Any, table: str, id: str) -> Path:
    """Where the store's storage key of a resource puts its files in the server's data folder (clients never see
    keys or paths)."""
    engine = sa.create_engine(server.store_url)
    with engine.connect() as conn:
        key = conn.execute(sa.text(f"SELECT key FROM {table} WHERE id = :i"), {"i": id}).scalar_one()
    engine.dispose()
    return server.data_dir / key


def storage(http: httpx.Client, kind: str) -> float:
    return _metric(http.get("/metrics").text, "ldd_storage_bytes", f'{{kind="{kind}"}}')


def upload(server: Any, http: httpx.Client, name: str) -> tuple[str, str]:
    """A dataset and a teacher checkpoint (an untrained gfl_tiny of the same classes)."""
    from distill.checkpoint import atomic_save, build_detector, detector_state

    zip_path = coco_zip(server.work / f"{name}.zip", n=4, size=(128, 96))
    with open(zip_path, "rb") as f:
        r = http.post("/v1/datasets", files={"file": (zip_path.name, f, "application/zip")})
    assert r.status_code == 201, r.text
    teacher = server.work / f"{name}.pt"
    atomic_save(detector_state(build_detector("gfl_tiny", 2, ["a", "b"])), teacher)
    with open(teacher, "rb") as f:
        c = http.post("/v1/checkpoints", files={"file": (teacher.name, f)})
    assert c.status_code == 201, c.text
    return r.json()["id"], c.json()["id"]


def test_dataset_checkpoint_and_job(server: Any, http: httpx.Client) -> None:
    pytest.importorskip("torch")
    dataset, checkpoint = upload(server, http, "one")
    ds_dir, ck_file = row_path(server, "datasets", dataset), row_path(server, "checkpoints", checkpoint)
    assert ds_dir.is_dir() and ck_file.is_file()
    r = http.post("/v1/jobs", json={"kind": "distill", "dataset": dataset, "teacher": {"checkpoint": checkpoint},
                                    "student": {"arch": "gfl_tiny"}, "schedule": SCHEDULE})  # fmt: skip
    assert r.status_code == 202, r.text
    job = r.json()["id"]

    # A queued job holds its dataset and teacher, and is not deleted itself; another tenant sees nothing.
    for path in (f"/v1/datasets/{dataset}", f"/v1/checkpoints/{checkpoint}", f"/v1/jobs/{job}"):
        r = http.delete(path)
        assert r.status_code == 409 and error_of(r)["code"] == "in_use", (path, r.text)
        assert error_of(r)["details"]["holders"] == [job], path
        assert http.delete(path, headers=B).status_code == 404
    assert ds_dir.is_dir() and ck_file.is_file()

    assert http.post(f"/v1/jobs/{job}/cancel").json()["state"] == "cancelled"
    run = server.data_dir / "runs" / job  # what a worker leaves behind
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"x" * 1000)
    runs_before, datasets_before, checkpoints_before = (storage(http, k) for k in ("runs", "datasets", "checkpoints"))
    assert http.delete(f"/v1/jobs/{job}").status_code == 204
    assert http.get(f"/v1/jobs/{job}").status_code == 404 and not run.exists()
    assert storage(http, "runs") <= runs_before - 1000

    # The job ended and is gone: nothing holds the files now.
    assert http.delete(f"/v1/datasets/{dataset}").status_code == 204
    assert http.delete(f"/v1/checkpoints/{checkpoint}").status_code == 204
    assert not ds_dir.exists() and not ck_file.exists()
    assert http.get(f"/v1/datasets/{dataset}").status_code == 404
    assert http.get(f"/v1/checkpoints/{checkpoint}").status_code == 404
    assert storage(http, "datasets") < datasets_before and storage(http, "checkpoints") < checkpoints_before
    assert http.delete(f"/v1/datasets/{dataset}").status_code == 404  # twice: it is gone


def test_study_with_its_jobs(server: Any, http: httpx.Client) -> None:
    pytest.importorskip("torch")
    dataset, checkpoint = upload(server, http, "two")
    body = {"dataset": dataset, "teacher": {"checkpoint": checkpoint}, "seeds": 1, "student": {"arch": "gfl_tiny"},
            "schedule": SCHEDULE, "methods": ["ld"]}  # fmt: skip
    r = http.post("/v1/studies", json=body)
    assert r.status_code == 202, r.text
    study = r.json()["id"]
    jobs = sorted(j["job_id"] for j in http.get(f"/v1/studies/{study}").json()["jobs"])
    assert len(jobs) == 2
    r = http.delete(f"/v1/studies/{study}")
    assert r.status_code == 409 and sorted(error_of(r)["details"]["holders"]) == jobs
    assert http.delete(f"/v1/studies/{study}", headers=B).status_code == 404
    http.post(f"/v1/studies/{study}/cancel")
    r = http.delete(f"/v1/jobs/{jobs[0]}")  # one job of a study goes with its study only
    assert r.status_code == 409 and error_of(r)["details"]["holders"] == [study]
    assert http.delete(f"/v1/studies/{study}").status_code == 204
    assert http.get(f"/v1/studies/{study}").status_code == 404
    assert all(http.get(f"/v1/jobs/{j}").status_code == 404 for j in jobs)
    assert not (server.data_dir / "studies" / study).exists()


def test_model_held_by_a_deployment(server: Any, http: httpx.Client) -> None:
    publish_test_model(server.data_dir, server.store_url, ["a", "b"], "mdl_delete000001")
    engine = sa.create_engine(server.store_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE models SET tenant = 'team-a' WHERE id = 'mdl_delete000001'"))
    engine.dispose()
    folder = row_path(server, "models", "mdl_delete000001")
    assert (folder / "model.onnx").is_file()
    assert http.post("/v1/deployments", json={"name": "cells", "model": "mdl_delete000001"}).status_code == 201
    r = http.delete("/v1/models/mdl_delete000001")
    assert r.status_code == 409 and error_of(r)["details"]["holders"] == ["team-a/cells"]
    assert http.delete("/v1/models/mdl_delete000001", headers=B).status_code == 404
    assert http.delete("/v1/deployments/cells", headers=B).status_code == 404
    before = storage(http, "models")
    assert http.delete("/v1/deployments/cells").status_code == 204
    assert http.get("/v1/deployments/cells").status_code == 404
    assert http.delete("/v1/models/mdl_delete000001").status_code == 204
    assert http.get("/v1/models/mdl_delete000001").status_code == 404 and not folder.exists()
    assert storage(http, "models") < before
    log = (server.work / f"api-{server.port}.log").read_text()
    assert "deleted model mdl_delete000001 (tenant team-a)" in log


def test_keep_checkpoints_prunes_the_older_ended_runs(tmp_path: Path) -> None:
    from core.deletion import prune_checkpoints
    from core.settings import Settings
    from core.store import Store

    settings = Settings(data_dir=tmp_path / "data", keep_checkpoints=2)
    store = Store(settings.store_url)
    try:
        ids = [store.create_job({"kind": "train", "dataset": f"ds_{i:016x}"})[0]["id"] for i in range(4)]
        for job_id in ids:
            (settings.run_dir(job_id) / "checkpoints").mkdir(parents=True)
            (settings.run_dir(job_id) / "checkpoints" / "last.pt").write_bytes(b"weights and optimiser")
            (settings.run_dir(job_id) / "model.pt").write_bytes(b"final weights")
        for job_id in ids[:3]:  # ended oldest first; the fourth is still queued
            assert store.request_cancel(job_id)["state"] == "cancelled"
        removed = prune_checkpoints(store, settings)
        assert removed == [f"runs/{ids[0]}/checkpoints"]
        kept = [(settings.run_dir(j) / "checkpoints" / "last.pt").exists() for j in ids]
        assert kept == [False, True, True, True]  # the newest 2 ended runs, and the running one
        assert all((settings.run_dir(j) / "model.pt").exists() for j in ids)
        assert prune_checkpoints(store, settings.model_copy(update={"keep_checkpoints": 0})) == []
    finally:
        store.close()


def test_a_rollback_to_a_deleted_model_is_refused(server: Any, http: httpx.Client) -> None:
    engine = sa.create_engine(server.store_url)
    for model_id in ("mdl_delete000002", "mdl_delete000003"):
        publish_test_model(server.data_dir, server.store_url, ["a", "b"], model_id)
        with engine.begin() as conn:
            conn.execute(sa.text("UPDATE models SET tenant = 'team-a' WHERE id = :i"), {"i": model_id})
    engine.dispose()
    assert http.post("/v1/deployments", json={"name": "old", "model": "mdl_delete000002"}).status_code == 201
    assert http.put("/v1/deployments/old", json={"model": "mdl_delete000003"}).status_code == 200
    assert http.delete("/v1/models/mdl_delete000002").status_code == 204  # only the history names it
    r = http.post("/v1/deployments/old/rollback")
    assert r.status_code == 409 and error_of(r)["code"] == "model_deleted"
    assert http.get("/v1/deployments/old").json()["model_id"] == "mdl_delete000003"

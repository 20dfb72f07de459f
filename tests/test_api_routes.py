"""Each router of ``api.routes`` stands alone: mounted on a bare FastAPI app, its services handed in through
``api.deps`` overrides (a real Store on SQLite, real Settings), with no ``create_app`` and no ``app.state``.
Requests go through the real ASGI stack in process (Starlette's TestClient); no server, no broker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api import deps
from api.errors import APIError, install_error_handlers
from api.routes import datasets, jobs
from core.settings import Settings
from core.store import Store
from distill.spec import JobSpec


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'ldd.db'}")
    yield s
    s.close()


def bare_app(router: object, store: Store, settings: Settings) -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)  # the error shape is part of what a route answers
    app.include_router(router)  # type: ignore[arg-type]
    app.dependency_overrides[deps.get_store] = lambda: store
    app.dependency_overrides[deps.get_settings] = lambda: settings
    assert not hasattr(app.state, "services")
    return app


def test_jobs_router_alone(tmp_path: Path, store: Store) -> None:
    spec = JobSpec.model_validate({"kind": "train", "dataset": "ds_0123456789abcdef"}).model_dump(mode="json")
    job, created = store.create_job(spec)
    assert created
    store.create_job({**spec, "seed": 1})
    with TestClient(bare_app(jobs.router, store, Settings(data_dir=tmp_path))) as http:
        listed = http.get("/v1/jobs").json()["jobs"]
        assert len(listed) == 2 and job["id"] in {j["id"] for j in listed}
        assert not {"lease_owner", "idempotency_key"} & set(listed[0])  # the presenter ran
        got = http.get(f"/v1/jobs/{job['id']}")
        assert got.status_code == 200 and got.json()["spec"]["dataset"] == "ds_0123456789abcdef"
        cancelled = http.post(f"/v1/jobs/{job['id']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        assert http.get("/v1/jobs", params={"state": "cancelled"}).json()["jobs"][0]["id"] == job["id"]
        again = http.post(f"/v1/jobs/{job['id']}/cancel")
        assert again.status_code == 409 and again.json()["error"]["code"] == "job_finished"
        events = http.get(f"/v1/jobs/{job['id']}/events")  # it has ended: one job event, then end
        assert events.status_code == 200 and events.text.count("event: job") == 1 and "event: end" in events.text
        for path in ("/v1/jobs/job_0000000000000000", "/v1/jobs/job_0000000000000000/events"):
            missing = http.get(path)
            assert missing.status_code == 404, path
            assert missing.json()["error"] == {"code": "not_found", "message": "no job 'job_0000000000000000'",
                                               "details": None}  # fmt: skip
    assert store.get_job(job["id"])["state"] == "cancelled"  # the route wrote to the store it was handed


def test_a_job_says_the_queue_of_its_size(tmp_path: Path, store: Store) -> None:
    """A client sees where its job waits: gpu, or gpu.N for N processes (only a worker with N slots takes it)."""
    two = {"kind": "train", "dataset": "ds_0123456789abcdef", "schedule": {"gpus": 2}}
    small, _ = store.create_job(JobSpec.model_validate({**two, "schedule": {}}).model_dump(mode="json"))
    big, _ = store.create_job(JobSpec.model_validate(two).model_dump(mode="json"))
    with TestClient(bare_app(jobs.router, store, Settings(data_dir=tmp_path))) as http:
        assert http.get(f"/v1/jobs/{small['id']}").json()["queue"] == "gpu"
        assert http.get(f"/v1/jobs/{big['id']}").json()["queue"] == "gpu.2"
        assert {j["id"]: j["queue"] for j in http.get("/v1/jobs").json()["jobs"]} == {small["id"]: "gpu",
                                                                                    big["id"]: "gpu.2"}  # fmt: skip


def test_datasets_router_alone(tmp_path: Path, store: Store) -> None:
    store.add_dataset("ds_00000000000000aa", "tiny", "datasets/ds_00000000000000aa", ["a"], 3, 4, {"train": 3}, [])
    with TestClient(bare_app(datasets.router, store, Settings(data_dir=tmp_path))) as http:
        listed = http.get("/v1/datasets").json()["datasets"]
        assert [d["id"] for d in listed] == ["ds_00000000000000aa"] and "key" not in listed[0]
        assert http.get("/v1/datasets/ds_00000000000000aa").json()["num_boxes"] == 4
        missing = http.get("/v1/datasets/ds_00000000000000bb")
        assert missing.status_code == 404 and missing.json()["error"]["message"] == "no dataset 'ds_00000000000000bb'"
        assert http.get("/v1/datasets/" + "x" * 65).status_code == 422  # ids are bounded before any lookup


def test_get_or_404() -> None:
    rows = {"ckpt_00000000000000aa": {"id": "ckpt_00000000000000aa"}}
    assert deps.get_or_404(rows.get, "checkpoint", "ckpt_00000000000000aa") == {"id": "ckpt_00000000000000aa"}
    with pytest.raises(APIError) as e:
        deps.get_or_404(rows.get, "checkpoint", "ckpt_00000000000000bb")
    assert (e.value.status, e.value.code) == (404, "not_found")
    assert e.value.message == "no checkpoint 'ckpt_00000000000000bb'"


@pytest.mark.parametrize("name", sorted(jobs.JOB_EXAMPLES))
def test_openapi_job_examples_are_valid_specs(name: str) -> None:
    """A documented example that the API would refuse is worse than none."""
    JobSpec.model_validate(jobs.JOB_EXAMPLES[name]["value"])

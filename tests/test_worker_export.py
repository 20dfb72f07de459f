"""The worker's export child and publishing with several formats: ``python -m worker.export --spec`` makes
fp32 and int8 with their AP measured on the job's validation split, ``worker.publish`` records one model per
format linked to the job and to the fp32 sibling, and the API says what serves each (real Store on SQLite,
real registry folders, the real routers on a bare app)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api import deps
from api.errors import install_error_handlers
from api.routes import health, models
from core.artifacts import Artifacts
from core.settings import Settings
from core.store import Store
from deploy.registry import read_model_json
from distill.checkpoint import detector_state
from tests.test_deploy_export import INPUT_SIZE
from tests.test_quantize import confident_detector, make_dataset
from worker.jobs import model_id_for
from worker.publish import publish_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    model = confident_detector()
    torch.save(detector_state(model, {"input_size": list(INPUT_SIZE), "metrics": {"AP": 0.9}}), run / "model.pt")
    dataset = make_dataset(run / "data", model)
    spec = {
        "kind": "train",
        "dataset": str(dataset),
        "val_split": 0.2,
        "seed": 0,
        "export": {"formats": ["fp32", "int8"]},
    }
    (run / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run(
        [sys.executable, "-m", "worker.export", str(run / "model.pt"), str(run / "export"), str(run / "export.json"),
         "--spec", str(run / "spec.json"), "--backend", "onnxruntime", "--providers", "cuda,cpu"],
        capture_output=True, text=True, cwd=run, timeout=900, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return {"run": run, "description": json.loads((run / "export.json").read_text())}


def test_export_child_makes_every_format_of_the_spec_with_its_runtime_ap(exported):
    d, export = exported["description"], exported["run"] / "export"
    assert d["format"] == "fp32" and set(d["variants"]) == {"int8"}
    assert read_model_json(export)["sha256"] == d["sha256"]
    assert read_model_json(export / "int8")["sha256"] == d["variants"]["int8"]["sha256"] != d["sha256"]
    for desc in (d, d["variants"]["int8"]):
        assert desc["metrics"]["images"] == 6 and desc["metrics"]["backend"] == "onnxruntime"
        assert desc["metrics"]["providers"][-1] == "CPUExecutionProvider"  # cuda asked for, skipped on this build
        assert desc["training_metrics"] == {"AP": 0.9}
    assert d["metrics"]["AP"] > 0.9
    calibration = d["variants"]["int8"]["export"]["int8"]["calibration"]
    assert calibration == {"source": "training split", "dataset": str(exported["run"] / "data"), "images": 6}


@pytest.fixture
def published(exported, tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'ldd.db'}")
    job, _ = store.create_job({"kind": "train", "dataset": "ds_0123456789abcdef"})
    artifacts = Artifacts(Settings(data_dir=tmp_path))  # published into tmp_path/models, as the API reads it
    model_id = model_id_for(job["id"])
    row = publish_model(
        store,
        artifacts,
        exported["run"] / "export",
        exported["description"],
        model_id=model_id,
        job_id=job["id"],
        name="tiny",
        kind="train",
        training_metrics={"AP": 0.9},
    )
    yield {"store": store, "artifacts": artifacts, "job": job, "row": row, "id": model_id, "tmp": tmp_path}
    store.close()


def test_each_format_is_its_own_model_linked_to_the_job_and_to_fp32(published, exported):
    store, job, fp32 = published["store"], published["job"], published["row"]
    int8_id = published["id"] + "int8"
    assert fp32["id"] == published["id"] and fp32["format"] == "fp32" and fp32["job_id"] == job["id"]
    assert fp32["meta"]["variants"] == {"int8": int8_id} and fp32["fp32_id"] is None
    int8 = store.get_model(int8_id)
    assert int8["format"] == "int8" and int8["job_id"] == job["id"] and int8["fp32_id"] == fp32["id"]
    assert int8["meta"]["metrics"] == exported["description"]["variants"]["int8"]["metrics"]
    assert int8["meta"]["name"] == "tiny" and "accuracy_warning" in int8["meta"]
    assert int8["tenant"] == job["tenant"]
    # The registry folder holds only what the runtime needs; the precision lives in the catalogue.
    assert read_model_json(published["tmp"] / "models" / int8_id)["id"] == int8_id
    assert [m["id"] for m in store.models_for_job(job["id"])] == [fp32["id"], int8_id]
    assert store.model_for_job(job["id"])["id"] == fp32["id"]
    assert store.newest_model()["id"] == fp32["id"]  # /detect's default stays the fp32 model
    assert {m["id"] for m in store.list_models()} == {fp32["id"], int8_id}


def test_publishing_again_changes_nothing(published, exported):
    store = published["store"]
    again = publish_model(
        store,
        published["artifacts"],
        exported["run"] / "export",
        exported["description"],
        model_id=published["id"],
        job_id=published["job"]["id"],
        name="tiny",
        kind="train",
    )
    assert again == published["row"] and len(store.list_models()) == 2


def _app(router, published, settings) -> FastAPI:
    services = deps.Services(settings, published["store"])
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(router)
    app.dependency_overrides[deps.get_services] = lambda: services
    app.dependency_overrides[deps.get_store] = lambda: published["store"]
    app.dependency_overrides[deps.get_settings] = lambda: settings
    app.dependency_overrides[deps.get_predictors] = lambda: services.predictors
    return app


def test_api_says_format_metrics_and_what_serves_each_model(published):
    settings = Settings(data_dir=published["tmp"])
    int8_id = published["id"] + "int8"
    with TestClient(_app(models.router, published, settings)) as http:
        got = http.get(f"/v1/models/{int8_id}").json()
        assert got["format"] == "int8" and got["fp32_id"] == published["id"] and got["job_id"] == published["job"]["id"]
        assert got["metrics"]["backend"] == "onnxruntime" and "AP" in got["metrics"]
        assert got["serving"] == {"backend": "onnxruntime", "providers": ["CPUExecutionProvider"], "loaded": False}
        listed = {m["id"]: m["format"] for m in http.get("/v1/models").json()["models"]}
        assert listed == {published["id"]: "fp32", int8_id: "int8"}
    ov = Settings(data_dir=published["tmp"], backend="openvino")
    with TestClient(_app(models.router, published, ov)) as http:
        assert http.get(f"/v1/models/{int8_id}").json()["serving"]["backend"] == "openvino"


def test_readyz_names_the_backend_and_providers_serving_the_newest_model(published):
    pytest.importorskip("openvino")
    for backend, providers in (("onnxruntime", ["CPUExecutionProvider"]), ("openvino", ["openvino-CPU"])):
        settings = Settings(data_dir=published["tmp"], backend=backend)
        with TestClient(_app(health.router, published, settings)) as http:
            body = http.get("/readyz").json()
        assert body["checks"]["model"] == f"ok ({published['id']})", body
        assert body["checks"]["serving"] == {"model": published["id"], "backend": backend, "providers": providers}


def test_a_models_precision_is_its_rows_not_its_metas(tmp_path):
    """model.json's schema tag is also called "format": whatever a model's meta says under that name, the
    precision is the row's own column, and /detect's default is the newest fp32 model."""
    store = Store(f"sqlite:///{tmp_path / 'ldd.db'}")
    try:
        store.add_model("mdl_0123456789", "job_0123456789", "/m", {"format": "ld-service-model/1", "classes": ["a"]})
        store.add_model("mdl_0123456789int8", "job_0123456789", "/m8", {"format": "ld-service-model/1"},
                        format="int8", fp32_id="mdl_0123456789")  # fmt: skip
        assert store.get_model("mdl_0123456789")["format"] == "fp32"
        assert store.newest_model()["id"] == "mdl_0123456789"
        assert [(m["format"], m["job_id"]) for m in store.list_models()] == [("int8", "job_0123456789"),
                                                                            ("fp32", "job_0123456789")]  # fmt: skip
        with pytest.raises(ValueError, match="fp32 sibling"):
            store.add_model("mdl_0123456789fp16", "job_0123456789", "/m16", {}, format="fp16")
        with pytest.raises(ValueError, match="fp32 sibling"):
            store.add_model("mdl_other", "job_0123456789", "/m", {}, fp32_id="mdl_0123456789")
    finally:
        store.close()

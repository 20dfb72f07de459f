"""mmdetection's standard RetinaNet, FCOS and ATSS over REST (issue 19, items 4 and 5), with a real API server
(torch blocked in it) and a real worker process.

- Served as they are: each fixture checkpoint, uploaded with ``POST /v1/checkpoints``, is published with
  ``POST /v1/models`` (an ``export`` job the worker runs: no training), exported to ONNX with its own decoding
  (deltas, distances, centerness), and predicts without torch: the ONNX Runtime outputs equal the torch
  model's on the same batch, and ``/v1/models/{id}/detect`` serves them.
- Real use: a distillation job whose teacher is the uploaded RetinaNet, its classes mapped by name onto a data
  set that names two of the teacher's three classes (read from the fixture's meta); a GFL and an FCOS student;
  then the standard model and the distilled student answer the same ``/detect`` side by side.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from api.client import APIClientError, Client
from deploy.runtime import Predictor, prepare_batch
from distill.checkpoint import load_detector
from distill.data.synthetic import make_synthetic
from distill.models.standard_served import ServedStandard, served
from tests.api_server import serve_api
from tests.service_fixtures import WorkerProcess
from tests.test_mmdet_standard import FAMILIES, _spec_of, make_checkpoint

pytestmark = pytest.mark.slow  # a server, a worker, five jobs: about 3 min alone on 2 cores

SCHEDULE = {"epochs": 1, "batch_size": 2, "image_size": [128, 96], "num_workers": 0, "warmup_iters": 2}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The server, its worker, the three fixtures uploaded and published, the distillation jobs submitted (the
    worker runs them in turn while the first tests check the published models)."""
    tmp = tmp_path_factory.mktemp("standard_serving")
    api = serve_api(tmp, LDD_LEASE_SECONDS="30", LDD_HEARTBEAT_SECONDS="1", LDD_PROGRESS_SECONDS="0.5")
    worker = WorkerProcess(api.env, tmp / "worker.log").start()
    try:
        c = Client(api.url, timeout=60)
        files, checkpoints, published = {}, {}, {}
        for family in FAMILIES:
            files[family] = tmp / f"{family}.pth"
            (tmp / f"{family}_spec.json").write_text(json.dumps(_spec_of(family)))
            make_checkpoint.write_checkpoint(tmp / f"{family}_spec.json", files[family])
            checkpoints[family] = c.upload_checkpoint(files[family], name=f"mmdet {family}")
            published[family] = c.publish_checkpoint(checkpoints[family]["id"])
        # A data set naming two of the teacher's three classes, in another order (KD maps them by name).
        teacher_classes = _spec_of("retina")["meta"]["dataset_meta"]["classes"]
        data = make_synthetic(tmp / "data", num_train=6, num_val=3, image_size=(128, 96), num_classes=2, seed=4)
        ann = json.loads((data / "annotations.json").read_text())
        names = [teacher_classes[2], teacher_classes[0]]
        for cat, name in zip(sorted(ann["categories"], key=lambda c: c["id"]), names, strict=True):
            cat["name"] = name
        (data / "annotations.json").write_text(json.dumps(ann))
        dataset = c.upload_dataset(data, name="renamed digits")
        distilled = {
            student: c.submit_job({"kind": "distill", "dataset": dataset["id"], "student": {"arch": student},
                                   "teacher": {"checkpoint": checkpoints["retina"]["id"]}, "schedule": SCHEDULE})
            for student in ("gfl_tiny", "fcos_tiny")
        }  # fmt: skip
        yield {"api": api, "worker": worker, "client": c, "files": files, "checkpoints": checkpoints,
               "published": published, "distilled": distilled, "names": names, "data": data, "tmp": tmp}  # fmt: skip
    finally:
        worker.kill_all()
        api.stop()


def _done(s: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    done = s["client"].wait(job["id"], timeout=600, poll=0.5)
    assert done["state"] == "succeeded", (done["error"], s["worker"].log_tail())
    return done


def _pictures(data: Path) -> list[Image.Image]:
    """Two validation pictures of different sizes (the second cropped), as the runtime reads them."""
    paths = sorted((data / "images").glob("*"))[:2]
    first, second = (Image.open(p).convert("RGB") for p in paths)
    return [first, second.crop((0, 0, 100, 80))]


@pytest.mark.parametrize("family", FAMILIES)
def test_published_without_training_and_its_onnx_equals_torch(service: dict[str, Any], family: str):
    s = service
    job = _done(s, s["published"][family])
    assert job["kind"] == "export" and job["spec"]["checkpoint"] == s["checkpoints"][family]["id"]
    model = s["client"].get_model(job["model_id"])
    assert model["arch"] == f"mmdet_{family}_r18_c64" and model["classes"] == ["class_0", "class_1", "class_2"]
    assert model["export"]["family"] == family and model["export"]["reg_max"] is None
    assert model["export"]["verification"]["unmatched"] == 0

    # The registry folder, read by the runtime (no torch in it), against the torch model on one batch.
    predictor = Predictor(Path(s["api"].data_dir) / "models" / job["model_id"])
    batch, sizes, _ = prepare_batch(_pictures(s["data"]), predictor.input_size)
    boxes, scores, labels, num = predictor.run(batch, sizes)
    torch_model = served(load_detector(s["files"][family]))
    assert isinstance(torch_model, ServedStandard)
    ref = torch_model.predict(torch.from_numpy(batch), [tuple(int(v) for v in hw) for hw in sizes])
    for i, r in enumerate(ref):
        k = int(num[i])
        assert k == len(r["scores"]) > 0
        np.testing.assert_allclose(scores[i, :k], r["scores"].numpy(), atol=1e-4)
        # Matched as sets (detections of equal score may come in either order): same class, box within 0.01 px.
        close = np.abs(boxes[i, :k, None] - r["boxes"].numpy()[None]).max(-1) < 1e-2  # (k, k)
        match = close & (labels[i, :k, None] == r["labels"].numpy()[None])
        assert match.any(1).all() and match.any(0).all()

    # Served over HTTP as the runtime predicts it.
    image = _pictures(s["data"])[0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    answer = s["client"].detect(buffer.getvalue(), model=job["model_id"], score_threshold=0.0)
    expected = predictor.predict([image])[0]
    assert [d["class_name"] for d in answer["detections"]] == [d["class_name"] for d in expected]
    np.testing.assert_allclose([d["box"] for d in answer["detections"]], [d["box"] for d in expected], atol=1e-3)


def test_only_a_detector_checkpoint_is_published(service: dict[str, Any]):
    c = service["client"]
    with pytest.raises(APIClientError) as missing:
        c.publish_checkpoint("ckpt_000000000000dead")
    assert missing.value.status == 404
    with pytest.raises(APIClientError) as odd:
        c._json("POST", "/v1/models", json={"checkpoint": service["checkpoints"]["fcos"]["id"], "path": "/etc"})
    assert odd.value.status == 422  # no field names a server path; unknown fields are refused


@pytest.mark.parametrize("student", ["gfl_tiny", "fcos_tiny"])
def test_distils_from_an_uploaded_mmdetection_checkpoint_over_rest(service: dict[str, Any], student: str):
    s = service
    job = _done(s, s["distilled"][student])
    metrics = job["metrics"]
    names = s["names"]
    assert metrics["class_map"]["by"] == "name"
    assert metrics["class_map"]["mapping"] == {name: name for name in names}
    assert metrics["teacher_overlap"]["teacher"] == f"checkpoint {s['checkpoints']['retina']['id']}"
    assert set(metrics["teacher_bbox"]) >= {"AP", "AP50"}
    model = s["client"].get_model(job["model_id"])
    assert model["classes"] == names and model["arch"] == student

    # The team's current detector and the distilled student on the same /detect.
    image = _pictures(s["data"])[0]
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    standard = _done(s, s["published"]["retina"])["model_id"]
    answers = {}
    for model_id, classes in ((standard, ["class_0", "class_1", "class_2"]), (job["model_id"], names)):
        answer = s["client"].detect(buffer.getvalue(), model=model_id, score_threshold=0.0, as_json=True)  # /detect
        expected = Predictor(Path(s["api"].data_dir) / "models" / model_id).predict([image])[0]
        assert answer["model"] == model_id and {d["class_name"] for d in answer["detections"]} <= set(classes)
        assert [d["class_name"] for d in answer["detections"]] == [d["class_name"] for d in expected]
        answers[model_id] = answer["detections"]
    assert answers[standard]  # a student of one epoch may find nothing above the graph's 0.05; the teacher does

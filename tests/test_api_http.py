"""The REST API over real HTTP, uploads and jobs: a uvicorn subprocess (torch blocked in it), Redis, SQLite.

Every bad dataset, checkpoint or job of issue 5 gets a 4xx with a clear message, nothing is stored, and the
server stays healthy. No worker runs here (jobs stay queued); tests/test_e2e_service.py runs the whole flow,
tests/test_api_http_serving.py the models and detection.
"""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.client import Client
from tests import api_server
from tests.api_server import ApiServer, assert_healthy, coco_zip, error_of, png_bytes, stored_state

server, http, dataset = api_server.server, api_server.http, api_server.dataset


# --------------------------------------------------------------------------------------------------
# Datasets


def test_dataset_upload_counts_and_layout(server: ApiServer, http: httpx.Client, dataset: dict[str, Any]) -> None:
    assert dataset["id"].startswith("ds_")
    assert dataset["classes"] == ["a", "b"] and dataset["num_images"] == 4 and dataset["num_boxes"] == 4
    assert dataset["splits"] == {"train": 3, "val": 1} and dataset["format"] == "coco"
    folder = server.data_dir / "datasets" / dataset["id"]  # type: ignore[attr-defined]
    assert (folder / "annotations.json").is_file() and len(list((folder / "images").iterdir())) == 4
    assert http.get(f"/v1/datasets/{dataset['id']}").json()["num_boxes"] == 4
    assert "path" not in http.get(f"/v1/datasets/{dataset['id']}").json()
    assert error_of(http.get("/v1/datasets/ds_nothinghere"))["code"] == "not_found"


def _zip_with(path: Path, entries: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, "/etc/passwd")
    return path


def test_bad_dataset_uploads_refused_and_nothing_stored(
    server: ApiServer, http: httpx.Client, dataset: dict[str, Any]
) -> None:
    work: Path = server.work  # type: ignore[attr-defined]
    good = coco_zip(work / "good2.zip").read_bytes()
    with zipfile.ZipFile(io.BytesIO(good)) as zf:
        good_entries = {n: zf.read(n) for n in zf.namelist()}
    bomb = work / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("ds/instances.json", good_entries["ds/instances.json"])
        zf.writestr("ds/images/huge.png", b"\0" * (70 << 20))  # 70 MB of zeros in ~70 KB
    cases: list[tuple[str, Path, int, str, str]] = [
        ("traversal", _zip_with(work / "dotdot.zip", {**good_entries, "ds/../../evil.txt": b"x"}), 400,
         "unsafe_archive", "outside"),
        ("absolute", _zip_with(work / "abs.zip", {**good_entries, "/tmp/evil.txt": b"x"}), 400,
         "unsafe_archive", "outside"),
        ("symlink", _zip_with(work / "link.zip", good_entries, symlink="ds/images/link.png"), 400,
         "unsafe_archive", "symbolic link"),
        ("bomb", bomb, 413, "archive_too_large", "zip bomb"),
        ("1 of 4 images damaged", coco_zip(work / "corrupt.zip", corrupt=1), 422, "too_many_damaged_images",
         "img_1.png"),
        ("missing image", coco_zip(work / "missing.zip", missing=2), 422, "invalid_dataset", "img_2.png"),
        ("box outside", coco_zip(work / "outside.zip", box_outside=0), 422, "invalid_dataset", "img_0.png"),
        ("no annotations", _zip_with(work / "noann.zip", {"x/a.png": png_bytes()}), 422, "invalid_dataset",
         "no annotations"),
        ("bad json", _zip_with(work / "badjson.zip", {"d/instances.json": b"{nope", "d/a.png": png_bytes()}), 422,
         "invalid_dataset", "not valid JSON"),
    ]  # fmt: skip
    not_zip = work / "x.zip"
    not_zip.write_bytes(b"PK\x03\x04 definitely not a zip archive")
    cases.append(("not a zip", not_zip, 400, "bad_archive", "zip"))
    oversized = work / "big.zip"
    oversized.write_bytes(os.urandom(5_100_000))
    cases.append(("oversized", oversized, 413, "payload_too_large", "limit"))
    before = stored_state(server, http)
    for what, path, status, code, text in cases:
        with open(path, "rb") as f:
            r = http.post("/v1/datasets", files={"file": (path.name, f, "application/zip")})
        assert r.status_code == status, (what, r.text)
        err = error_of(r)
        assert err["code"] == code, (what, err)
        assert text.lower() in (err["message"] + json.dumps(err["details"])).lower(), (what, err)
        assert stored_state(server, http) == before, what
    assert not (work.parent / "evil.txt").exists()
    assert_healthy(http)


def test_voc_zip_with_xml_beside_images(server: ApiServer, http: httpx.Client) -> None:
    xml = (
        "<annotation><filename>pic.png</filename><size><width>200</width><height>150</height><depth>3</depth>"
        "</size><object><name>thing</name><difficult>0</difficult><bndbox><xmin>31</xmin><ymin>21</ymin>"
        "<xmax>120</xmax><ymax>100</ymax></bndbox></object></annotation>"
    )
    path = _zip_with(server.work / "voc.zip", {"v/pic.png": png_bytes(), "v/pic.xml": xml.encode()})  # type: ignore[attr-defined]
    with open(path, "rb") as f:
        r = http.post("/v1/datasets", files={"file": ("voc.zip", f, "application/zip")})
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "voc" and r.json()["classes"] == ["thing"] and r.json()["num_boxes"] == 1


# --------------------------------------------------------------------------------------------------
# Checkpoints and jobs


@pytest.fixture(scope="module")
def mmdet_checkpoint(server: ApiServer, http: httpx.Client) -> dict[str, Any]:
    """An mmdetection-layout checkpoint (``{"meta", "state_dict"}``) of a 3-class tiny GFL.

    (The shared 46 MB fixture is read in tests/test_api_ckpt_reader.py; this server's upload limit is 5 MB.)
    """
    torch = pytest.importorskip("torch")
    from distill.checkpoint import build_detector

    sd = build_detector("gfl_tiny", 3).state_dict()
    path = server.work / "mmdet_tiny.pth"  # type: ignore[attr-defined]
    meta = {"mmdet_version": "3.3.0", "dataset_meta": {"classes": ("x", "y", "z")}}
    torch.save({"meta": meta, "state_dict": {k: v for k, v in sd.items() if "integral" not in k}}, path)
    with open(path, "rb") as f:
        r = http.post("/v1/checkpoints", files={"file": (path.name, f, "application/octet-stream")})
    assert r.status_code == 201, r.text
    return r.json()


def _upload_state_dict(server: ApiServer, http: httpx.Client, name: str, obj: Any) -> dict[str, Any]:
    torch = pytest.importorskip("torch")
    path = server.work / name  # type: ignore[attr-defined]
    torch.save(obj, path)
    with open(path, "rb") as f:
        r = http.post("/v1/checkpoints", files={"file": (path.name, f, "application/octet-stream")})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture(scope="module")
def backbone_checkpoint(server: ApiServer, http: httpx.Client) -> dict[str, Any]:
    """gfl_tiny's ResNet body alone, in torchvision's key layout (a student's initial weights)."""
    pytest.importorskip("torch")
    from distill.checkpoint import build_detector

    return _upload_state_dict(server, http, "tiny_backbone.pth", build_detector("gfl_tiny", 2).backbone.state_dict())


@pytest.fixture(scope="module")
def reg_max_8_checkpoint(server: ApiServer, http: httpx.Client) -> dict[str, Any]:
    """A gfl_tiny whose box branch has reg_max 8: LD cannot compare its edge distributions with a student's."""
    torch = pytest.importorskip("torch")
    from distill.checkpoint import build_detector

    sd = build_detector("gfl_tiny", 2).state_dict()
    channels = sd["bbox_head.gfl_reg.weight"].shape[1]
    sd["bbox_head.gfl_reg.weight"] = torch.zeros(4 * (8 + 1), channels, 3, 3)
    sd["bbox_head.gfl_reg.bias"] = torch.zeros(4 * (8 + 1))
    return _upload_state_dict(server, http, "reg_max_8.pth", {"meta": {}, "state_dict": sd})


def test_checkpoint_upload(server: ApiServer, http: httpx.Client, mmdet_checkpoint: dict[str, Any]) -> None:
    arch = mmdet_checkpoint["arch"]
    assert mmdet_checkpoint["id"].startswith("ckpt_")
    assert (arch["name"], arch["num_classes"], arch["reg_max"], arch["classes"]) == ("gfl_tiny", 3, 16, ["x", "y", "z"])
    assert arch["source"] == "mmdetection" and arch["strides"] == [8, 16, 32, 64, 128]
    assert arch["kind"] == "detector"
    assert http.get(f"/v1/checkpoints/{mmdet_checkpoint['id']}").json()["arch"] == arch
    before = stored_state(server, http)
    r = http.post("/v1/checkpoints", files={"file": ("junk.pt", b"\x80\x02not a checkpoint", "application/x")})
    assert r.status_code == 422 and error_of(r)["code"] == "invalid_checkpoint"
    assert stored_state(server, http) == before


def test_backbone_checkpoint_upload(http: httpx.Client, backbone_checkpoint: dict[str, Any]) -> None:
    arch = backbone_checkpoint["arch"]
    assert (arch["kind"], arch["depth"], arch["base_width"], arch["layout"]) == ("backbone", 18, 16, "torchvision")
    assert arch["num_classes"] is None and arch["reg_max"] is None  # a detector's fields: none here
    assert http.get(f"/v1/checkpoints/{backbone_checkpoint['id']}").json()["arch"] == arch


def _job(dataset_id: str, **over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "train", "dataset": dataset_id, "student": {"arch": "gfl_tiny"},
                            "schedule": {"epochs": 1, "batch_size": 2, "image_size": [128, 96]}}  # fmt: skip
    body.update(over)
    return body


def test_bad_jobs_refused_and_nothing_stored(
    server: ApiServer,
    http: httpx.Client,
    dataset: dict[str, Any],
    mmdet_checkpoint: dict[str, Any],
    backbone_checkpoint: dict[str, Any],
    reg_max_8_checkpoint: dict[str, Any],
) -> None:
    ds = dataset["id"]
    distill = {"kind": "distill", "teacher": {"checkpoint": mmdet_checkpoint["id"]}}
    missing = "00000000deadbeef"  # ids of the right shape that name nothing
    queued = http.post("/v1/jobs", json=_job(ds, name="stays queued"))
    assert queued.status_code == 202
    queued_id = queued.json()["id"]
    cases: list[tuple[str, Any, int, str, str]] = [
        ("malformed JSON", b'{"kind": "train", "dataset": ', 400, "malformed_json", "not valid JSON"),
        ("not an object", b"[1, 2]", 422, "invalid_request", "valid dictionary"),
        ("unknown field", _job(ds, colour="red"), 422, "invalid_request", "colour"),
        ("nested unknown field", _job(ds, schedule={"epochz": 3}), 422, "invalid_request", "schedule.epochz"),
        ("wrong type", _job(ds, schedule={"epochs": "many"}), 422, "invalid_request", "schedule.epochs"),
        ("tau <= 0", _job(ds, **distill, distill={"tau": 0}), 422, "invalid_request", "distill.tau"),
        ("negative tau", _job(ds, **distill, distill={"tau": -1}), 422, "invalid_request", "distill.tau"),
        ("gamma > 1", _job(ds, **distill, distill={"gamma": 1.5}), 422, "invalid_request", "distill.gamma"),
        ("unknown arch", _job(ds, student={"arch": "yolo_v9"}), 422, "invalid_request", "unknown architecture"),
        ("unknown kind", _job(ds, kind="finetune"), 422, "invalid_request", "kind"),
        ("train with teacher", _job(ds, teacher={"model": "x"}), 422, "invalid_request", "teacher"),
        ("distill without teacher", _job(ds, kind="distill"), 422, "invalid_request", "teacher"),
        ("unknown dataset", _job("ds_" + missing), 404, "unknown_dataset", "ds_" + missing),
        ("teacher path", _job(ds, kind="distill", teacher={"path": "/etc/passwd"}), 422, "invalid_request",
         "teacher.path"),
        ("unknown init checkpoint", _job(ds, student={"arch": "gfl_tiny", "init": {"checkpoint": "ckpt_" + missing}}),
         404, "unknown_checkpoint", "ckpt_" + missing),
        ("init of another width", _job(ds, student={"arch": "gfl_small", "init": {"checkpoint":
         backbone_checkpoint["id"]}}), 422, "invalid_init", "width"),
        # (every form of a server path: tests/test_api_no_server_paths.py)
        ("unknown teacher model", _job(ds, kind="distill", teacher={"model": "mdl_" + missing}), 404,
         "invalid_teacher", "mdl_" + missing),
        ("unknown teacher job", _job(ds, kind="distill", teacher={"job": "job_" + missing}), 404,
         "invalid_teacher", "job_" + missing),
        ("unfinished teacher job", _job(ds, kind="distill", teacher={"job": queued_id}), 422, "invalid_teacher",
         "not succeeded"),
        ("backbone as teacher", _job(ds, kind="distill", teacher={"checkpoint": backbone_checkpoint["id"]}), 422,
         "invalid_teacher", "backbone"),
        ("teacher mismatch", _job(ds, kind="distill", teacher={"checkpoint": reg_max_8_checkpoint["id"]}), 422,
         "teacher_mismatch", "reg_max"),
        ("loss weight < 0", _job(ds, loss={"giou": -1}), 422, "invalid_request", "loss.giou"),
        ("detector weight in distill.weights", _job(ds, **distill, distill={"weights": {"dfl": 0.25}}), 422,
         "invalid_request", "distill.weights.dfl"),
    ]  # fmt: skip
    before = stored_state(server, http)
    for what, body, status, code, text in cases:
        if isinstance(body, bytes):
            r = http.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
        else:
            r = http.post("/v1/jobs", json=body)
        assert r.status_code == status, (what, r.text)
        err = error_of(r)
        assert err["code"] == code, (what, err)
        assert text.lower() in err["message"].lower(), (what, err)
    assert stored_state(server, http) == before
    assert_healthy(http)


def test_jobs_with_uploaded_teacher_and_init_accepted(
    http: httpx.Client,
    dataset: dict[str, Any],
    mmdet_checkpoint: dict[str, Any],
    backbone_checkpoint: dict[str, Any],
) -> None:
    """The teacher's classes need not be the dataset's (KD maps them by name, LD needs none): the 3-class
    teacher serves the 2-class dataset. A backbone fits a student with the same ResNet layout."""
    distill = _job(dataset["id"], kind="distill", teacher={"checkpoint": mmdet_checkpoint["id"]},
                   student={"arch": "gfl_tiny", "init": {"checkpoint": backbone_checkpoint["id"]}})  # fmt: skip
    r = http.post("/v1/jobs", json=distill)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] == "queued" and job["spec"]["student"]["init"] == {"checkpoint": backbone_checkpoint["id"]}
    assert job["spec"]["loss"] == {"cls": 1.0, "giou": 2.0, "dfl": 0.25}  # the defaults, filled in
    assert http.post(f"/v1/jobs/{job['id']}/cancel").json()["state"] == "cancelled"


def test_submit_idempotency_cancel_and_events(http: httpx.Client, dataset: dict[str, Any]) -> None:
    body = _job(dataset["id"], name="idem")
    r1 = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "key-1"})
    assert r1.status_code == 202, r1.text
    job = r1.json()
    assert job["state"] == "queued" and job["spec"]["schedule"]["epochs"] == 1 and job["attempts"] == 0
    r2 = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "key-1"})
    assert r2.status_code == 202 and r2.json()["id"] == job["id"] and r2.headers["Idempotent-Replayed"] == "true"
    r3 = http.post("/v1/jobs", json={**body, "seed": 7}, headers={"Idempotency-Key": "key-1"})
    assert r3.status_code == 422 and error_of(r3)["code"] == "idempotency_conflict"
    assert [j["id"] for j in http.get("/v1/jobs", params={"state": "queued"}).json()["jobs"]].count(job["id"]) == 1

    # Follow the job's events while it is cancelled (no worker here: it is still queued).
    events: list[tuple[str, dict[str, Any]]] = []
    client = Client(str(http.base_url), api_key="")
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(lambda: list(client.events(job["id"], timeout=30)))
        time.sleep(1.0)
        r = http.post(f"/v1/jobs/{job['id']}/cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        events = fut.result(timeout=30)
    assert events[0][1]["state"] == "queued"
    assert events[-1][0] == "end" and events[-1][1]["state"] == "cancelled"
    again = http.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409 and error_of(again)["code"] == "job_finished"
    assert error_of(http.get("/v1/jobs/job_nothinghere"))["code"] == "not_found"
    assert http.get("/v1/jobs/job_nothinghere/events").status_code == 404
    assert http.get("/v1/jobs", params={"state": "bogus"}).status_code == 422


def test_a_few_damaged_images_are_dropped_and_listed_many_are_refused(
    server: ApiServer, http: httpx.Client, tmp_path: Path
) -> None:
    """A truncated JPEG among good photos (1 of 25, under LDD_MAX_BAD_IMAGE_FRACTION's 5%) costs that image, not
    the upload: it is dropped and named in ``problems``; 3 of 25 (12%) refuse the upload, naming all three."""
    with open(coco_zip(tmp_path / "one.zip", n=25, size=(160, 120), corrupt=7), "rb") as f:
        r = http.post("/v1/datasets", files={"file": ("one.zip", f, "application/zip")})
    assert r.status_code == 201, r.text
    ds = r.json()
    assert ds["num_images"] == 24 and any("img_7.png" in p and "cannot decode" in p for p in ds["problems"])
    before = stored_state(server, http)
    with open(coco_zip(tmp_path / "three.zip", n=25, size=(160, 120), corrupt=(2, 9, 13)), "rb") as f:
        r = http.post("/v1/datasets", files={"file": ("three.zip", f, "application/zip")})
    assert r.status_code == 422, r.text
    err = error_of(r)
    assert err["code"] == "too_many_damaged_images" and "3 of 25" in err["message"]
    assert all(f"img_{i}.png" in json.dumps(err["details"]) for i in (2, 9, 13))
    assert stored_state(server, http) == before

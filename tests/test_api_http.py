"""The REST API over real HTTP: a uvicorn subprocess (torch blocked in it), Redis, SQLite, ONNX Runtime.

Every bad input of issue 5 gets a 4xx with a clear message, nothing is stored, and the server stays
healthy. No worker runs here (jobs stay queued); tests/test_e2e_service.py runs the whole flow.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw

from api.cli import api_command
from api.client import Client
from tests.service_fixtures import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
REDIS_HOST = "127.0.0.1:6379"

# --------------------------------------------------------------------------------------------------
# Helpers shared with the end-to-end tests


def torch_blocker(folder: Path) -> Path:
    """A ``sitecustomize`` that makes ``import torch`` fail: the API must serve without torch."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        "import sys\nsys.modules['torch'] = None  # import torch -> ImportError in this process\n"
    )
    return folder


def private_redis_url() -> str:
    """A database number of the shared Redis that other test modules are unlikely to use."""
    import redis

    db = random.Random().randint(6, 15)
    client = redis.Redis.from_url(f"redis://{REDIS_HOST}/{db}", socket_connect_timeout=2)
    try:
        client.flushdb()
    except redis.RedisError as e:
        pytest.skip(f"Redis not reachable at {REDIS_HOST}: {e}")
    finally:
        client.close()
    return f"redis://{REDIS_HOST}/{db}"


class ApiServer:
    """``uvicorn --factory api.app:create_app`` (the command ``ldd up`` and docker-compose run)."""

    def __init__(self, env: dict[str, str], workdir: Path, block_torch: bool = True):
        self.env, self.workdir, self.block_torch = env, workdir, block_torch
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / f"api-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> ApiServer:
        paths = [str(ROOT)]
        if self.block_torch:
            paths.insert(0, str(torch_blocker(self.workdir / "no_torch")))
        env = {**os.environ, **self.env, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(api_command("127.0.0.1", self.port), cwd=ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)  # fmt: skip

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"the API exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout, "the API to answer /healthz", interval=0.2)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def client(self, api_key: str | None = None) -> Client:
        return Client(self.url, api_key=api_key or "", timeout=60)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def make_image(size: tuple[int, int], box: tuple[int, int, int, int], color: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", size, (90, 110, 100))
    ImageDraw.Draw(img).rectangle(box, fill=color)
    return img


def coco_zip(
    path: Path,
    n: int = 4,
    size: tuple[int, int] = (64, 48),
    classes: tuple[str, ...] = ("a", "b"),
    *,
    corrupt: int | None = None,
    missing: int | None = None,
    box_outside: int | None = None,
    prefix: str = "ds/",
) -> Path:
    """A small COCO dataset zip (one filled rectangle per image), optionally broken in one way."""
    images, anns = [], []
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(n):
            x, y = 4 + 3 * i, 5 + 2 * i
            box = (x, y, x + 20, y + 16)
            name = f"images/img_{i}.png"
            images.append({"id": i + 1, "file_name": name, "width": size[0], "height": size[1],
                           "split": "val" if i == n - 1 else "train"})  # fmt: skip
            bbox = [x, y, 20, 16] if i != box_outside else [size[0] + 10, size[1] + 10, 20, 16]
            anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % len(classes), "bbox": bbox,
                         "area": 320, "iscrowd": 0})  # fmt: skip
            if i == missing:
                continue
            buf = io.BytesIO()
            make_image(size, box, (200, 40 * i % 255, 30)).save(buf, "PNG")
            data = buf.getvalue() if i != corrupt else buf.getvalue()[:40]
            zf.writestr(prefix + name, data)
        cats = [{"id": k + 1, "name": c} for k, c in enumerate(classes)]
        zf.writestr(prefix + "instances.json", json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


def png_bytes(size: tuple[int, int] = (200, 150)) -> bytes:
    buf = io.BytesIO()
    make_image(size, (30, 20, 120, 100), (220, 60, 40)).save(buf, "PNG")
    return buf.getvalue()


def publish_test_model(
    data_dir: Path, store_url: str, classes: list[str], model_id: str, job_id: str | None = None
) -> dict[str, Any]:
    """Export an untrained gfl_tiny to ONNX and publish it exactly as the worker does (registry + store); with
    ``job_id``, as that job's model (its tenant's)."""
    torch = pytest.importorskip("torch")
    from deploy.export import export_model
    from deploy.registry import Registry
    from distill.checkpoint import atomic_save, build_detector, detector_state
    from worker.publish import publish_model
    from worker.store import Store

    work = data_dir / "tmp_export" / model_id
    model = build_detector("gfl_tiny", len(classes), classes=classes)
    with torch.no_grad():  # confident everywhere, so every image gets (up to 100) detections to check
        model.bbox_head.gfl_cls.bias.fill_(2.0)
    atomic_save(detector_state(model, meta={"input_size": [128, 96]}), work / "model.pt")
    description = export_model(work / "model.pt", work / "export")
    store = Store(store_url)
    try:
        return publish_model(store, Registry(data_dir / "models"), work / "export", description, model_id=model_id,
                             job_id=job_id)  # fmt: skip
    finally:
        store.close()


def error_of(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"}, body
    assert {"code", "message", "details"} <= set(body["error"]), body
    assert body["error"]["message"], body
    return body["error"]


# --------------------------------------------------------------------------------------------------
# Fixtures


def serve_api(work: Path, **env: str) -> ApiServer:
    """An API server over a fresh data folder in ``work``, its broker a private Redis database; ``env`` adds
    or overrides ``LDD_*`` (and other) variables."""
    data_dir = work / "data"
    srv = ApiServer({"LDD_DATA_DIR": str(data_dir), "LDD_BROKER_URL": private_redis_url(), **env}, work).start()
    srv.data_dir = data_dir  # type: ignore[attr-defined]
    srv.store_url = f"sqlite:///{data_dir / 'ldd.db'}"  # type: ignore[attr-defined]
    srv.work = work  # type: ignore[attr-defined]
    return srv


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = serve_api(tmp_path_factory.mktemp("api_http"), LDD_MAX_UPLOAD_BYTES=str(5_000_000),
                    LDD_MAX_IMAGE_PIXELS=str(1_000_000))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server: ApiServer) -> Any:
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def dataset(server: ApiServer, http: httpx.Client) -> dict[str, Any]:
    path = coco_zip(server.work / "good.zip")  # type: ignore[attr-defined]
    with open(path, "rb") as f:
        r = http.post("/v1/datasets", files={"file": ("good.zip", f, "application/zip")}, data={"name": "good"})
    assert r.status_code == 201, r.text
    return r.json()


@pytest.fixture(scope="module")
def model(server: ApiServer) -> dict[str, Any]:
    return publish_test_model(server.data_dir, server.store_url, ["a", "b"], "mdl_testmodel")  # type: ignore[attr-defined]


def assert_healthy(http: httpx.Client) -> None:
    assert http.get("/healthz").status_code == 200
    r = http.get("/readyz")
    assert r.status_code == 200, r.text


def stored_state(server: ApiServer, http: httpx.Client) -> tuple[Any, ...]:
    """What an upload or a job could have changed: rows and files."""
    data_dir: Path = server.data_dir  # type: ignore[attr-defined]
    tmp = data_dir / "tmp"
    return (
        sorted(d["id"] for d in http.get("/v1/datasets").json()["datasets"]),
        sorted(j["id"] for j in http.get("/v1/jobs").json()["jobs"]),
        sorted(p.name for p in (data_dir / "datasets").iterdir()),
        sorted(p.name for p in (data_dir / "checkpoints").iterdir()),
        sorted(p.name for p in tmp.iterdir()) if tmp.exists() else [],
    )


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
        ("corrupt image", coco_zip(work / "corrupt.zip", corrupt=1), 422, "invalid_dataset", "img_1.png"),
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
    server: ApiServer, http: httpx.Client, dataset: dict[str, Any], mmdet_checkpoint: dict[str, Any],
    backbone_checkpoint: dict[str, Any], reg_max_8_checkpoint: dict[str, Any],
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
    http: httpx.Client, dataset: dict[str, Any], mmdet_checkpoint: dict[str, Any],
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


# --------------------------------------------------------------------------------------------------
# Models and detection


def test_models_list_get_and_onnx(http: httpx.Client, model: dict[str, Any]) -> None:
    listed = http.get("/v1/models").json()["models"]
    assert [m["id"] for m in listed][:1] == ["mdl_testmodel"]
    got = http.get("/v1/models/mdl_testmodel").json()
    assert got["classes"] == ["a", "b"] and got["sha256"]
    onnx = http.get("/v1/models/mdl_testmodel/onnx")
    assert onnx.status_code == 200 and hashlib.sha256(onnx.content).hexdigest() == got["sha256"]
    assert error_of(http.get("/v1/models/mdl_nothinghere"))["code"] == "not_found"


def test_detect_multipart_and_json_agree_in_original_pixels(
    server: ApiServer, http: httpx.Client, model: dict[str, Any]
) -> None:
    img = png_bytes((300, 170))
    a = http.post("/detect", files={"file": ("x.png", img, "image/png")})
    assert a.status_code == 200, a.text
    b = http.post("/v1/models/mdl_testmodel/detect", json={"image": base64.b64encode(img).decode()})
    assert b.status_code == 200, b.text
    a, b = a.json(), b.json()
    assert a["model"] == b["model"] == "mdl_testmodel" and a["image_size"] == [300, 170]
    assert a["detections"] == b["detections"] and len(a["detections"]) >= 5
    for d in a["detections"]:
        x1, y1, x2, y2 = d["box"]
        assert -1 <= x1 <= x2 <= 301 and -1 <= y1 <= y2 <= 171
        assert d["class_name"] in ("a", "b") and 0 <= d["score"] <= 1
    # Exactly what the bare predictor says for the same bytes: the API adds no transformation of its own.
    from deploy.runtime import Predictor

    bare = Predictor(server.data_dir / "models" / "mdl_testmodel").predict([img])[0]  # type: ignore[attr-defined]
    assert a["detections"] == bare
    high = http.post("/detect?score_threshold=0.9", files={"file": ("x.png", img, "image/png")}).json()
    assert all(d["score"] >= 0.9 for d in high["detections"])


def test_detect_bad_inputs(server: ApiServer, http: httpx.Client, model: dict[str, Any]) -> None:
    huge = io.BytesIO()
    Image.new("L", (2000, 1000)).save(huge, "PNG")  # 2 Mpx, over this server's 1 Mpx limit, tiny file
    truncated = png_bytes()[:120]
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("text file", {"files": {"file": ("a.txt", b"hello, not an image", "text/plain")}}, 400, "bad_image"),
        ("truncated png", {"files": {"file": ("a.png", truncated, "image/png")}}, 400, "bad_image"),
        ("empty file", {"files": {"file": ("a.png", b"", "image/png")}}, 400, "bad_image"),
        ("too many pixels", {"files": {"file": ("a.png", huge.getvalue(), "image/png")}}, 400, "bad_image"),
        ("oversized", {"files": {"file": ("a.png", os.urandom(5_100_000), "image/png")}}, 413, "payload_too_large"),
        ("no file", {"files": {"other": ("a.png", png_bytes(), "image/png")}}, 422, "invalid_request"),
        ("bad base64", {"json": {"image": "***"}}, 400, "bad_image"),
        ("json not image", {"json": {"image": base64.b64encode(b"GIF89a nope").decode()}}, 400, "bad_image"),
        ("json unknown field", {"json": {"image": "", "colour": 1}}, 422, "invalid_request"),
        ("bad threshold", {"json": {"image": "", "score_threshold": 2}}, 422, "invalid_request"),
        ("malformed json", {"content": b"{", "headers": {"Content-Type": "application/json"}}, 400,
         "malformed_json"),
        ("wrong content type", {"content": b"abc", "headers": {"Content-Type": "text/plain"}}, 415,
         "unsupported_media_type"),
    ]  # fmt: skip
    for what, kw, status, code in cases:
        r = http.post("/detect", **kw)
        assert r.status_code == status, (what, r.text)
        assert error_of(r)["code"] == code, (what, r.text)
    r = http.post("/v1/models/mdl_nothinghere/detect", files={"file": ("a.png", png_bytes(), "image/png")})
    assert r.status_code == 404
    # One good request still works, and the server is healthy.
    assert http.post("/detect", files={"file": ("a.png", png_bytes(), "image/png")}).status_code == 200
    assert_healthy(http)


def test_concurrent_detects_are_batched(http: httpx.Client, model: dict[str, Any]) -> None:
    img = png_bytes((160, 120))

    def one(_: int) -> httpx.Response:
        return httpx.post(str(http.base_url) + "/detect", files={"file": ("x.png", img, "image/png")}, timeout=60)

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(24)))
    assert all(r.status_code == 200 for r in results)
    assert len({json.dumps(r.json()["detections"]) for r in results}) == 1  # batching changes no answer
    metrics = http.get("/metrics").text
    count = _metric(metrics, "ldd_detect_batch_size_count")
    total = _metric(metrics, "ldd_detect_batch_size_sum")
    assert count >= 1 and total >= 24
    assert total / count > 1.0, f"24 concurrent requests never shared a session call ({count} calls)"


def _metric(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not in /metrics")


def test_metrics(http: httpx.Client, dataset: dict[str, Any]) -> None:
    http.get(f"/v1/datasets/{dataset['id']}")
    text = http.get("/metrics").text
    assert 'route="/v1/datasets/{dataset_id}"' in text  # the route template, not the id
    assert dataset["id"] not in text
    assert "ldd_http_request_duration_seconds_bucket" in text
    assert _metric(text, "ldd_jobs", '{state="cancelled"}') >= 0
    assert "ldd_queue_depth" in text


def test_openapi_documents_every_endpoint(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    paths = spec["paths"]
    for path, method in [
        ("/v1/datasets", "post"), ("/v1/datasets", "get"), ("/v1/datasets/{dataset_id}", "get"),
        ("/v1/checkpoints", "post"), ("/v1/jobs", "post"), ("/v1/jobs", "get"), ("/v1/jobs/{job_id}", "get"),
        ("/v1/jobs/{job_id}/cancel", "post"), ("/v1/jobs/{job_id}/events", "get"), ("/v1/models", "get"),
        ("/v1/models/{model_id}", "get"), ("/v1/models/{model_id}/onnx", "get"),
        ("/v1/models/{model_id}/detect", "post"), ("/detect", "post"), ("/healthz", "get"), ("/readyz", "get"),
        ("/metrics", "get"),
    ]:  # fmt: skip
        assert method in paths.get(path, {}), (path, method)
    jobs = paths["/v1/jobs"]["post"]
    assert jobs["requestBody"]["content"]["application/json"]["examples"]["distill"]["value"]["kind"] == "distill"
    assert set(paths["/detect"]["post"]["requestBody"]["content"]) == {"multipart/form-data", "application/json"}


# --------------------------------------------------------------------------------------------------
# Auth, and the API without torch


def test_api_keys(tmp_path: Path) -> None:
    env = {"LDD_DATA_DIR": str(tmp_path / "data"), "LDD_BROKER_URL": private_redis_url(), "LDD_API_KEYS": "k1, k2"}
    srv = ApiServer(env, tmp_path).start()
    try:
        for key, status in ((None, 401), ("wrong", 401), ("k1", 200), ("k2", 200)):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            for method, path in (("GET", "/v1/jobs"), ("GET", "/v1/models"), ("GET", "/v1/datasets")):
                r = httpx.request(method, srv.url + path, headers=headers)
                assert r.status_code == status, (key, path, r.text)
                if status == 401:
                    assert error_of(r)["code"] == "unauthorized" and r.headers["WWW-Authenticate"] == "Bearer"
        for path in ("/v1/jobs", "/detect", "/v1/datasets", "/v1/checkpoints"):
            assert httpx.post(srv.url + path, json={}).status_code == 401, path
        r = httpx.post(srv.url + "/v1/jobs", json={}, headers={"Authorization": "Basic azE6"})
        assert r.status_code == 401
        for path in ("/healthz", "/readyz", "/metrics"):
            assert httpx.get(srv.url + path).status_code == 200, path
        assert srv.client("k1").list_jobs() == []
    finally:
        srv.stop()


def test_api_imports_and_builds_without_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import api.app, api.cli, api.client, api.datasets, api.deps, api.detect_body, deploy.runtime\n"
        "import api.routes.checkpoints, api.routes.datasets, api.routes.detect, api.routes.health\n"
        "import api.routes.jobs, api.routes.models, deploy.draw, deploy.registry, distill.ckpt_reader, worker.checks\n"
        "from worker.settings import Settings\n"
        f"app = api.app.create_app(Settings(data_dir={str(tmp_path)!r}))\n"
        "assert app.openapi()['paths']\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision') and sys.modules[m])\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# --------------------------------------------------------------------------------------------------
# Schemathesis: generated requests from the OpenAPI spec never get a 5xx


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors(
    server: ApiServer, http: httpx.Client, dataset: dict[str, Any], model: dict[str, Any]
) -> None:
    st = Path(sys.executable).with_name("schemathesis")
    if not st.exists():
        pytest.skip("schemathesis is not installed")
    cmd = [str(st), "run", f"{server.url}/openapi.json", "--checks", "not_a_server_error", "--max-examples", "5",
           "--seed", "1", "--workers", "1", "--max-time", "40", "--request-timeout", "30"]  # fmt: skip
    out = subprocess.run(cmd, cwd=server.work, capture_output=True, text=True, timeout=300)  # type: ignore[attr-defined]
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert re.search(r"(\d+) generated, \1 passed", out.stdout), out.stdout[-3000:]
    assert_healthy(http)


# --------------------------------------------------------------------------------------------------
# Last in this module: it publishes a damaged model, which is then the newest one (readyz says so).


def test_tampered_model_is_refused(server: ApiServer, http: httpx.Client, model: dict[str, Any]) -> None:
    from worker.store import Store

    models: Path = server.data_dir / "models"  # type: ignore[attr-defined]
    shutil.copytree(models / "mdl_testmodel", models / "mdl_tampered")
    onnx = models / "mdl_tampered" / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    store = Store(server.store_url)  # type: ignore[attr-defined]
    try:
        meta = json.loads((models / "mdl_tampered" / "model.json").read_text())
        store.add_model("mdl_tampered", None, str(models / "mdl_tampered"), {**meta, "id": "mdl_tampered"})
    finally:
        store.close()
    r = http.post("/v1/models/mdl_tampered/detect", files={"file": ("a.png", png_bytes(), "image/png")})
    assert r.status_code == 503, r.text
    assert error_of(r)["code"] == "model_unavailable" and "sha256" in error_of(r)["message"]
    ready = http.get("/readyz")
    assert ready.status_code == 503 and "mdl_tampered" in ready.json()["checks"]["model"]
    # The intact model still answers.
    ok = http.post("/v1/models/mdl_testmodel/detect", files={"file": ("a.png", png_bytes(), "image/png")})
    assert ok.status_code == 200

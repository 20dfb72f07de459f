"""The REST API over real HTTP for tests: a uvicorn subprocess (torch blocked in it) on a private Redis
database and SQLite, sample uploads (COCO zips, PNGs), an untrained published model, the module-scoped
fixtures ``server``, ``http``, ``dataset`` and ``model``, and the checks the API tests share.

A test module takes the fixtures by naming them at its top (``server, http = api_server.server,
api_server.http``): each module then gets its own server, so no module sees another's uploads.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image, ImageDraw

from api.cli import api_command
from api.client import Client
from bench.servers import free_port, terminate, wait_for

ROOT = Path(__file__).resolve().parents[1]
REDIS_HOST = "127.0.0.1:6379"

# --------------------------------------------------------------------------------------------------
# The server and what tests send it


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
        terminate(self.proc, 15)
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
    corrupt: int | tuple[int, ...] | None = None,
    missing: int | None = None,
    box_outside: int | None = None,
    prefix: str = "ds/",
) -> Path:
    """A small COCO dataset zip (one filled rectangle per image), optionally broken in one way (``corrupt``:
    the images, by index, whose file is truncated)."""
    damaged = {corrupt} if isinstance(corrupt, int) else set(corrupt or ())
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
            data = buf.getvalue() if i not in damaged else buf.getvalue()[:40]
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
    from core.artifacts import Artifacts
    from core.settings import Settings
    from core.store import Store
    from deploy.export import export_model
    from distill.checkpoint import atomic_save, build_detector, detector_state
    from worker.publish import publish_model

    work = data_dir / "tmp_export" / model_id
    model = build_detector("gfl_tiny", len(classes), classes=classes)
    with torch.no_grad():  # confident everywhere, so every image gets (up to 100) detections to check
        model.bbox_head.gfl_cls.bias.fill_(2.0)
    atomic_save(detector_state(model, meta={"input_size": [128, 96]}), work / "model.pt")
    description = export_model(work / "model.pt", work / "export")
    store = Store(store_url)
    try:
        artifacts = Artifacts(Settings(data_dir=data_dir, store_url=store_url))
        return publish_model(store, artifacts, work / "export", description, model_id=model_id, job_id=job_id)
    finally:
        store.close()


def error_of(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"}, body
    assert {"code", "message", "details"} <= set(body["error"]), body
    assert body["error"]["message"], body
    return body["error"]


# --------------------------------------------------------------------------------------------------
# Fixtures and shared checks


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
    srv = serve_api(
        tmp_path_factory.mktemp("api_http"), LDD_MAX_UPLOAD_BYTES=str(5_000_000), LDD_MAX_IMAGE_PIXELS=str(1_000_000)
    )
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


def _metric(text: str, name: str, labels: str = "") -> float:
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or (not labels and line.startswith(name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not in /metrics")

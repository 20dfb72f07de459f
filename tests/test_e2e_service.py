"""The whole user flow over HTTP with real parts, on real photos (shared/data/raccoon-voc).

1. Production layout: PostgreSQL store, Redis broker, a uvicorn API (torch blocked in it) and a Celery
   worker subprocess: upload a VOC zip, train a teacher while the API is restarted, follow it by SSE,
   distil a student from it, poll to the end, models published, ``/detect`` in original pixels.
2. Embedded layout through the command line: ``ldd up`` (SQLite, filesystem broker), ``ldd datasets
   upload FOLDER``, ``ldd jobs submit --watch``, ``ldd models list``, ``ldd detect --draw``, Ctrl-C.

Models are tiny and schedules short: these tests prove the plumbing, not the accuracy (bench/ does that).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from api.client import Client
from bench.servers import free_port
from tests.api_server import ApiServer, private_redis_url
from tests.service_fixtures import WorkerProcess, postgres_database, wait_for
from tests.shared_data import needs_shared, shared_path

ROOT = Path(__file__).resolve().parents[1]
RACCOON = shared_path("data/raccoon-voc")

pytestmark = [
    pytest.mark.slow,
    needs_shared("data/raccoon-voc"),
]


def service_env(
    data_dir: Path, *, store_url: str, broker_url: str, api_keys: str = "", max_upload_bytes: int = 200_000_000
) -> dict[str, str]:
    """The ``LDD_*`` variables of a deployment: the same names docker-compose.yml sets (test_compose)."""
    return {
        "LDD_DATA_DIR": str(data_dir),
        "LDD_STORE_URL": store_url,
        "LDD_BROKER_URL": broker_url,
        "LDD_API_KEYS": api_keys,
        "LDD_MAX_UPLOAD_BYTES": str(max_upload_bytes),
        "LDD_MAX_IMAGE_PIXELS": "40000000",
        "LDD_MAX_ATTEMPTS": "3",
        "LDD_LEASE_SECONDS": "20",
        "LDD_HEARTBEAT_SECONDS": "2",
    }


def raccoon_subset(dest: Path, n: int) -> Path:
    """A Pascal VOC folder (``annotations/`` + ``images/``, as published) with the first ``n`` photos."""
    names = sorted((RACCOON / "annotations").glob("*.xml"), key=lambda p: int(p.stem.split("-")[1]))[:n]
    for sub in ("annotations", "images"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for xml in names:
        shutil.copyfile(xml, dest / "annotations" / xml.name)
        shutil.copyfile(RACCOON / "images" / f"{xml.stem}.jpg", dest / "images" / f"{xml.stem}.jpg")
    return dest


def zip_dir(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, p.relative_to(folder).as_posix())
    return dest


def tiny_schedule(epochs: int) -> dict[str, Any]:
    return {"epochs": epochs, "batch_size": 4, "image_size": [128, 96], "num_workers": 0, "warmup_iters": 5,
            "lr": 0.01}  # fmt: skip


def check_detect(client: Client, data_dir: Path, model_id: str, image: Path) -> dict[str, Any]:
    """``/detect`` answers in the photo's own pixels, exactly as the bare predictor does."""
    from deploy.runtime import Predictor

    res = client.detect(image, model=model_id)
    w, h = Image.open(image).size
    assert res["model"] == model_id and res["image_size"] == [w, h]
    bare = Predictor(data_dir / "models" / model_id).predict([image.read_bytes()])[0]
    assert res["detections"] == bare
    for d in res["detections"]:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h and d["class_name"] == "raccoon"
    return res


def test_full_flow_postgres_redis_with_api_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with postgres_database() as store_url:
        env = service_env(data_dir, store_url=store_url, broker_url=private_redis_url())
        api = ApiServer(env, tmp_path).start()
        worker = WorkerProcess(env, tmp_path / "worker.log").start()
        try:
            client = api.client()
            voc = raccoon_subset(tmp_path / "voc", 24)
            ds = client.upload_dataset(zip_dir(voc, tmp_path / "raccoon.zip"), name="raccoon")
            assert (ds["format"], ds["classes"], ds["num_images"]) == ("voc", ["raccoon"], 24)
            assert ds["num_boxes"] >= 24

            teacher = client.submit_job({"kind": "train", "name": "teacher", "dataset": ds["id"],
                                         "student": {"arch": "gfl_tiny"}, "schedule": tiny_schedule(1)})  # fmt: skip
            assert teacher["state"] == "queued"
            wait_for(lambda: client.get_job(teacher["id"])["state"] != "queued", 120, "the worker to start the job")

            # The API restarts (new process, new port) while the job runs: the job does not notice.
            api.stop()
            api = ApiServer(env, tmp_path).start()
            client = api.client()
            events = list(client.events(teacher["id"], timeout=600))
            assert events[-1][0] == "end"
            done = events[-1][1]
            assert done["state"] == "succeeded", (done.get("error"), worker.log_tail())
            iters = [e[1]["progress"]["iter"] for e in events if (e[1].get("progress") or {}).get("iter") is not None]
            assert iters == sorted(iters) and iters[-1] == done["progress"]["total_iters"]
            assert done["attempts"] == 1 and done["model_id"] and "AP" in done["metrics"]["bbox"]

            student = client.submit_job(
                {"kind": "distill", "name": "distilled", "dataset": ds["id"], "student": {"arch": "gfl_tiny"},
                 "teacher": {"job": teacher["id"]}, "schedule": tiny_schedule(1), "seed": 1},
                idempotency_key="e2e-distill",
            )  # fmt: skip
            final = client.wait(student["id"], timeout=600, poll=1.0)
            assert final["state"] == "succeeded", (final.get("error"), worker.log_tail())
            assert final["attempts"] == 1
            # pycocotools says -1 when it evaluated nothing: a real AP is in [0, 1].
            assert 0.0 <= final["metrics"]["bbox"]["AP"] <= 1.0
            diag = final["metrics"]["diagnostics"]  # the distillation really ran against the teacher
            assert diag["before"] and len(diag["after"]["box_l1"]) == 5 and diag["after"]["images"] > 0

            models = {m["id"]: m for m in client.list_models()}
            assert set(models) == {done["model_id"], final["model_id"]}  # exactly one model per job
            assert models[final["model_id"]]["job_id"] == student["id"]
            assert models[final["model_id"]]["classes"] == ["raccoon"]
            photo = voc / "images" / "raccoon-1.jpg"
            check_detect(client, data_dir, final["model_id"], photo)
            default = client.detect(photo)  # /detect without a model: the newest one
            assert default["model"] == final["model_id"]
            assert client.ready()[0]
        finally:
            worker.stop()
            api.stop()


def test_embedded_mode_through_the_cli(tmp_path: Path) -> None:
    """``ldd up`` with nothing but SQLite, local folders and the filesystem broker."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LDD_")}
    env.update({"PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "LDD_URL": url, "LDD_LEASE_SECONDS": "20",
                "LDD_HEARTBEAT_SECONDS": "2"})  # fmt: skip
    log = open(tmp_path / "up.log", "wb")
    up = subprocess.Popen([sys.executable, "-m", "api.cli", "up", "--port", str(port), "--data-dir", str(data_dir)],
                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip

    def ldd(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "api.cli", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip

    try:
        Client(url).wait_ready(60)
        assert (data_dir / "broker").is_dir()  # the embedded broker, not Redis
        folder = raccoon_subset(tmp_path / "voc", 12)
        out = ldd("datasets", "upload", str(folder), "--name", "raccoon-small")
        assert out.returncode == 0, out.stderr
        ds = json.loads(out.stdout)
        assert ds["num_images"] == 12 and ds["classes"] == ["raccoon"]

        spec = tmp_path / "spec.json"
        spec.write_text(json.dumps({"kind": "train", "dataset": "set below", "schedule": tiny_schedule(1)}))
        out = ldd("jobs", "submit", str(spec), "--dataset", ds["id"], "--arch", "gfl_tiny", "--watch")
        assert out.returncode == 0, (out.stdout, out.stderr, (tmp_path / "up.log").read_text()[-3000:])
        assert "100%" in out.stderr and "succeeded" in out.stderr  # the progress bar, from SSE
        result = json.loads(out.stdout[out.stdout.rindex('{\n  "id"') :])
        assert result["state"] == "succeeded" and result["model_id"]

        out = ldd("models", "list")
        assert out.returncode == 0 and result["model_id"] in out.stdout
        drawn = tmp_path / "boxes.png"
        photo = folder / "images" / "raccoon-1.jpg"
        out = ldd("detect", str(photo), "--draw", str(drawn))
        assert out.returncode == 0, out.stderr
        det = json.loads(out.stdout)
        assert det["model"] == result["model_id"] and det["image_size"] == list(Image.open(photo).size)
        assert Image.open(drawn).size == Image.open(photo).size

        out = ldd("jobs", "status", "job_0000000000000000")  # well formed, unknown
        assert out.returncode == 2 and "404" in out.stderr
    finally:
        up.send_signal(signal.SIGINT)  # Ctrl-C stops the API and the worker
        try:
            up.wait(60)
        finally:
            log.close()
            if up.poll() is None:
                up.kill()
    assert up.returncode == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/healthz", timeout=2)

"""Room checks (issue 15): with ``LDD_MIN_FREE_BYTES`` above what the data folder has free, uploads get 507 and
leave nothing behind, the service stays healthy, ``/readyz`` and ``/metrics`` report the free space, and a
worker refuses to start a child that would write into a full folder. Real API server and worker."""

from __future__ import annotations

import io
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api_server import _metric, coco_zip, error_of, serve_api, stored_state
from tests.service_fixtures import IMAGE_SIZE, Service, train_spec

HUGE = 10**18  # more than any disk has free


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Any:
    srv = serve_api(tmp_path_factory.mktemp("room"), LDD_MIN_FREE_BYTES=str(HUGE))
    yield srv
    srv.stop()


def test_uploads_into_a_full_data_folder_get_507_and_leave_nothing(full: Any) -> None:
    with httpx.Client(base_url=full.url, timeout=60) as http:
        before = stored_state(full, http)
        zipped = coco_zip(full.work / "ds.zip")
        for path, what in (("/v1/datasets", zipped), ("/v1/checkpoints", zipped)):
            with open(what, "rb") as f:
                r = http.post(path, files={"file": (what.name, f, "application/octet-stream")})
            assert r.status_code == 507, r.text
            err = error_of(r)
            assert err["code"] == "insufficient_storage" and "LDD_MIN_FREE_BYTES" in err["message"]
            assert err["details"]["min_free_bytes"] == HUGE and err["details"]["needed_bytes"] == what.stat().st_size
            assert stored_state(full, http) == before, path
        # Healthy, and it says why uploads are refused.
        assert http.get("/healthz").status_code == 200
        ready = http.get("/readyz")
        assert ready.status_code == 200, ready.text
        disk = ready.json()["checks"]["disk"]
        assert disk["status"].startswith("low") and disk["min_free_bytes"] == HUGE and disk["free_bytes"] > 0
        text = http.get("/metrics").text
        assert _metric(text, "ldd_data_free_bytes") > 0 and _metric(text, "ldd_data_min_free_bytes") == HUGE


def test_an_archive_that_unpacks_past_the_room_is_refused_before_unpacking(tmp_path: Path) -> None:
    """The archive fits but what it declares to unpack does not: 507 before extraction, nothing left."""
    free = shutil.disk_usage(tmp_path).free
    srv = serve_api(tmp_path, LDD_MIN_FREE_BYTES=str(free - (100 << 20)), LDD_MAX_UPLOAD_BYTES=str(300 << 20))
    try:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
            zf.writestr("d/big.bin", b"\0" * (200 << 20))  # 200 MB unpacked, about 200 KB zipped
        with httpx.Client(base_url=srv.url, timeout=120) as http:
            before = stored_state(srv, http)
            r = http.post("/v1/datasets", files={"file": ("big.zip", buf.getvalue(), "application/zip")})
            assert r.status_code == 507, r.text
            assert error_of(r)["details"]["needed_bytes"] in (200 << 20, len(buf.getvalue()))
            assert stored_state(srv, http) == before
            ready = http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["checks"]["disk"]["status"] == "ok"
    finally:
        srv.stop()


@pytest.mark.timeout(300)
def test_worker_fails_a_job_it_has_no_room_for(tmp_path: Path) -> None:
    from distill.data.synthetic import make_synthetic

    data = make_synthetic(tmp_path / "syn", num_train=4, num_val=2, image_size=IMAGE_SIZE, num_classes=2, seed=0)
    service = Service(tmp_path, "filesystem://", data, LDD_MIN_FREE_BYTES=str(HUGE))
    try:
        service.start_worker()
        job = service.wait_end(service.submit(train_spec("ds_00000000000005e1", epochs=1)), timeout=180)
        assert job["state"] == "failed" and job["attempts"] == 1, job
        assert "not enough room to start training" in job["error"] and "LDD_MIN_FREE_BYTES" in job["error"]
        assert not os.path.exists(service.settings.run_dir(job["id"]) / "checkpoints")
    finally:
        service.close()

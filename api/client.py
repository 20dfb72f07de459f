"""A small Python client of the REST API (httpx), used by the ``ldd`` command line, the demo and tests.

    c = Client("http://127.0.0.1:8000", api_key=None)
    ds = c.upload_dataset("raccoon.zip")          # or a folder: zipped on the fly
    job = c.submit_job({"kind": "train", "dataset": ds["id"], "student": {"arch": "gfl_tiny"}})
    for event, body in c.events(job["id"]): ...
    c.detect("photo.jpg")["detections"]

Errors from the server raise :class:`APIClientError` carrying the error shape's code, message and details.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_STATES = ("succeeded", "failed", "cancelled")


class APIClientError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message, self.details = status, code, message, details


def zip_folder(folder: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Zip ``folder``'s files (paths relative to it) into ``dest``; images are stored, not recompressed."""
    folder, dest = Path(folder), Path(dest)
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file() and not p.is_symlink():
                compress = zipfile.ZIP_DEFLATED if p.suffix.lower() in (".json", ".xml", ".txt", ".csv") else None
                zf.write(p, p.relative_to(folder).as_posix(), compress_type=compress or zipfile.ZIP_STORED)
    return dest


class Client:
    def __init__(self, url: str | None = None, api_key: str | None = None, timeout: float = 120.0):
        self.url = (url or os.environ.get("LDD_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("LDD_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------------

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        r = self.http.request(method, path, **kw)
        if r.status_code >= 400:
            raise error_from(r)
        return r

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        return self.request(method, path, **kw).json()

    # -- health -------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return self._json("GET", "/healthz")

    def ready(self) -> tuple[bool, dict[str, Any]]:
        r = self.http.get("/readyz")
        return r.status_code == 200, r.json()

    def wait_ready(self, timeout: float = 60.0, need_ready: bool = False) -> None:
        """Wait until the server answers ``/healthz`` (or ``/readyz`` with ``need_ready``)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if need_ready:
                    if self.ready()[0]:
                        return
                elif self.http.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url} not {'ready' if need_ready else 'up'} after {timeout:.0f} s")
            time.sleep(0.2)

    # -- datasets and checkpoints ---------------------------------------------------------------

    def upload_dataset(
        self, path: str | os.PathLike, name: str | None = None, val_split: float | None = None,
        split_seed: int | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Upload a dataset zip, or a folder (zipped to a temporary file first). ``val_split`` and ``split_seed``:
        the draw that splits a data set whose images name no split (the server's defaults when None)."""
        path = Path(path)
        if path.is_dir():
            with tempfile.TemporaryDirectory() as tmp:
                archive = zip_folder(path, Path(tmp) / f"{path.name}.zip")
                return self.upload_dataset(archive, name or path.name, val_split, split_seed)
        with open(path, "rb") as f:
            given = {"name": name, "val_split": val_split, "split_seed": split_seed}
            data = {k: str(v) for k, v in given.items() if v is not None}
            return self._json("POST", "/v1/datasets", files={"file": (path.name, f, "application/zip")}, data=data)

    def list_datasets(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/datasets")["datasets"]

    def get_dataset(self, dataset_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/datasets/{dataset_id}")

    def upload_checkpoint(self, path: str | os.PathLike, name: str | None = None) -> dict[str, Any]:
        path = Path(path)
        with open(path, "rb") as f:
            data = {"name": name} if name else {}
            return self._json(
                "POST", "/v1/checkpoints", files={"file": (path.name, f, "application/octet-stream")}, data=data
            )

    # -- jobs -----------------------------------------------------------------------------------

    def submit_job(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/v1/jobs", json=spec, headers=headers)

    def get_job(self, job_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/jobs/{job_id}")

    def list_jobs(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if state:
            params["state"] = state
        return self._json("GET", "/v1/jobs", params=params)["jobs"]

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/jobs/{job_id}/cancel")

    def events(self, job_id: str, timeout: float | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(event, job)`` pairs from ``/v1/jobs/{id}/events`` until the job ends (event ``end``)."""
        t = httpx.Timeout(30.0, read=timeout)
        with self.http.stream("GET", f"/v1/jobs/{job_id}/events", timeout=t) as r:
            if r.status_code >= 400:
                r.read()
                raise error_from(r)
            event, data = "message", []
            for line in r.iter_lines():
                if line == "":
                    if data:
                        yield event, json.loads("\n".join(data))
                        if event == "end":
                            return
                    event, data = "message", []
                elif line.startswith(":"):
                    continue
                elif line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())

    def wait(self, job_id: str, timeout: float = 3600.0, poll: float = 1.0) -> dict[str, Any]:
        """Poll until the job ends; returns the final job."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if job["state"] in TERMINAL_STATES:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['state']} after {timeout:.0f} s")
            time.sleep(poll)

    # -- studies --------------------------------------------------------------------------------

    def submit_study(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._json("POST", "/v1/studies", json=spec, headers=headers)

    def get_study(self, study_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/studies/{study_id}")

    def list_studies(self, limit: int = 50) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/studies", params={"limit": limit})["studies"]

    def cancel_study(self, study_id: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/studies/{study_id}/cancel")

    def study_report(self, study_id: str, chart: bool = False) -> bytes:
        """The study's report.md (or with ``chart`` its report.png); 404 until every job ended."""
        return self.request("GET", f"/v1/studies/{study_id}/report.{'png' if chart else 'md'}").content

    # -- models and detection -------------------------------------------------------------------

    def list_models(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/models")["models"]

    def get_model(self, model_id: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/models/{model_id}")

    def publish_checkpoint(
        self, checkpoint: str, name: str | None = None, formats: list[str] | None = None
    ) -> dict[str, Any]:
        """Publish an uploaded detector checkpoint as it is (no training): the export job; its ``model_id`` is
        the model once it succeeded (``wait``)."""
        body: dict[str, Any] = {"checkpoint": checkpoint, "name": name}
        if formats:
            body["export"] = {"formats": formats}
        return self._json("POST", "/v1/models", json=body)

    def download_onnx(self, model_id: str, dest: str | os.PathLike) -> Path:
        dest = Path(dest)
        with self.http.stream("GET", f"/v1/models/{model_id}/onnx") as r:
            if r.status_code >= 400:
                r.read()
                raise error_from(r)
            with open(dest, "wb") as f:
                for chunk in r.iter_bytes():
                    f.write(chunk)
        return dest

    def detect(
        self,
        image: str | os.PathLike | bytes,
        model: str | None = None,
        score_threshold: float | None = None,
        as_json: bool = False,
        deployment: str | None = None,
    ) -> dict[str, Any]:
        """Detections for one image (a path or the file's bytes), multipart by default or base64 JSON; by
        ``model``, else ``deployment``, else the server's default."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        name = "image" if isinstance(image, bytes) else Path(image).name
        if as_json:
            body: dict[str, Any] = {"image": base64.b64encode(data).decode()}
            if model:
                body["model"] = model
            if score_threshold is not None:
                body["score_threshold"] = score_threshold
            return self._json("POST", "/detect", json=body)
        form: dict[str, Any] = {}
        if score_threshold is not None:
            form["score_threshold"] = str(score_threshold)
        path = (
            f"/v1/models/{model}/detect"
            if model
            else f"/v1/deployments/{deployment}/detect"
            if deployment
            else "/detect"
        )
        return self._json("POST", path, files={"file": (name, data, "application/octet-stream")}, data=form)

    # -- deployments and deletion ---------------------------------------------------------------

    def create_deployment(self, name: str, model: str) -> dict[str, Any]:
        return self._json("POST", "/v1/deployments", json={"name": name, "model": model})

    def update_deployment(self, name: str, model: str) -> dict[str, Any]:
        """A new version of ``name`` serving ``model`` (409 with the reason when it is incompatible)."""
        return self._json("PUT", f"/v1/deployments/{name}", json={"model": model})

    def rollback_deployment(self, name: str) -> dict[str, Any]:
        return self._json("POST", f"/v1/deployments/{name}/rollback")

    def list_deployments(self) -> list[dict[str, Any]]:
        return self._json("GET", "/v1/deployments")["deployments"]

    def get_deployment(self, name: str) -> dict[str, Any]:
        return self._json("GET", f"/v1/deployments/{name}")

    def delete(self, kind: str, id: str) -> None:
        """``DELETE /v1/<kind>/<id>`` (kind: datasets, checkpoints, jobs, studies, models, deployments); a 409
        (``in_use``) names the holders in its details."""
        self.request("DELETE", f"/v1/{kind}/{id}")


def error_from(r: httpx.Response) -> APIClientError:
    try:
        err = r.json()["error"]
        return APIClientError(r.status_code, err.get("code", "error"), err.get("message", ""), err.get("details"))
    except (ValueError, KeyError, TypeError):
        return APIClientError(r.status_code, "error", r.text[:500])

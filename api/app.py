"""The REST API (DESIGN section 4). Run it with ``uvicorn --factory api.app:create_app`` or ``ldd api``.

This process never imports torch (the serving image has none): jobs are validated with the pydantic
``distill.spec``, datasets with the torch-free ``distill.data`` readers, checkpoints with
``api.ckpt_reader`` and detections come from ``deploy.runtime`` (ONNX Runtime). The job store
(``worker.store``) is the source of truth; the broker only carries wake-ups (``worker.queue``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.datastructures import UploadFile as FormFile
from starlette.formparsers import MultiPartException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import schemas
from api.batcher import PredictorCache
from api.ckpt_reader import CheckpointError, describe_checkpoint
from api.datasets import UploadError, ZipLimits, import_dataset, publish_dataset, remove_tree
from api.errors import APIError, ErrorResponse, error_response, install_error_handlers, validation_message
from api.metrics import CONTENT_TYPE, LatencyMiddleware, Metrics
from distill.spec import JobSpec
from worker.queue import broker_ok, enqueue
from worker.resolve import JobRefused, teacher_checkpoint, teacher_mismatch
from worker.settings import Settings
from worker.store import JOB_STATES, TERMINAL_STATES, IdempotencyConflict, Store, new_id

log = logging.getLogger("ldd.api")

JSON_BODY_LIMIT = 1 << 20
DETECT_BODY_LIMIT = 50 << 20
UPLOAD_CHUNK = 1 << 20
# Module level: FastAPI resolves the (postponed) annotations of route functions in module globals.
BEARER = HTTPBearer(auto_error=False, description="an API key from LDD_API_KEYS")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "malformed request (bad JSON, bad zip, undecodable image)",
        401: "missing or wrong API key",
        404: "not found",
        413: "upload too large",
        422: "validation failed (the message says which field and why)",
    }.items()
}

_JOB_EXAMPLES = {
    "distill": {
        "summary": "distil a ResNet-18 student from a published teacher",
        "value": {
            "kind": "distill",
            "name": "r18-from-r101",
            "dataset": "ds_3f2a9c1b0d4e5f67",
            "student": {"arch": "gfl_r18"},
            "teacher": {"model": "mdl_job_5e6f7a8b9c0d1e2f"},
            "distill": {
                "tau": 10,
                "gamma": 0.25,
                "kd_tau": 2,
                "method": "ld",
                "weights": {"main_ld": 0.25, "vlr_ld": 0.25, "main_kd": 1.0, "vlr_kd": 0.0, "dfl": 0.25},
            },
            "schedule": {"epochs": 12, "batch_size": 16, "image_size": [1333, 800]},
            "seed": 0,
        },  # fmt: skip
    },
    "train": {
        "summary": "train a detector alone (e.g. the teacher)",
        "value": {
            "kind": "train",
            "dataset": "ds_3f2a9c1b0d4e5f67",
            "student": {"arch": "gfl_r50"},
            "schedule": {"epochs": 12, "batch_size": 8},
        },  # fmt: skip
    },
}

_DETECT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "the image file"},
                        "model": {"type": "string", "description": "model id (only for /detect)"},
                        "score_threshold": {"type": "number", "minimum": 0, "maximum": 1},
                    },
                }
            },
            "application/json": {
                "schema": schemas.DetectJSON.model_json_schema(),
                "example": {"image": schemas.TINY_PNG_B64, "score_threshold": 0.3},
            },
        },
    }
}


# --------------------------------------------------------------------------------------------------
# Request size limits (before anything is parsed, so an oversized upload never fills the disk)


def body_limit(path: str, settings: Settings) -> int:
    if path in ("/v1/datasets", "/v1/checkpoints"):
        return settings.max_upload_bytes
    if path == "/detect" or path.endswith("/detect"):
        return min(settings.max_upload_bytes, DETECT_BODY_LIMIT)
    return min(settings.max_upload_bytes, JSON_BODY_LIMIT)


class BodyLimitMiddleware:
    """Answers 413 as soon as a request body goes over its route's limit.

    With a ``Content-Length`` over the limit nothing is read into the app; otherwise bytes are counted
    as they stream in and the app's own (partial) response is replaced by the 413. Up to 4 MiB of the
    rest of the body is read and dropped first so ordinary clients see the answer instead of a reset.
    """

    def __init__(self, app: ASGIApp, settings: Settings):
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = body_limit(scope["path"], self.settings)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(receive, send, limit, 0)
            return
        received, over, started = 0, False, False

        async def _receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    over = True
                    raise _TooLarge()
            return message

        async def _send(message: Message) -> None:
            nonlocal started
            if over:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, _receive, _send)
        except _TooLarge:
            pass
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._refuse(receive, send, limit, received)

    @staticmethod
    async def _refuse(receive: Receive, send: Send, limit: int, already: int) -> None:
        drained, more = already, True
        while more and drained < limit + (4 << 20):
            message = await receive()
            if message["type"] != "http.request":
                break
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)
        response = error_response(413, "payload_too_large", f"the request body is over the limit of {limit} bytes")
        await response({"type": "http"}, receive, send)


class _TooLarge(Exception):
    pass


# --------------------------------------------------------------------------------------------------
# Helpers

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
assert set(JobState.__args__) == set(JOB_STATES)  # the store's states, spelled out for OpenAPI
_EVENT_FIELDS = ("state", "progress", "metrics", "error", "model_id", "attempts", "cancel_requested")


def public_job(job: dict[str, Any]) -> dict[str, Any]:
    """The job as clients see it (lease bookkeeping stays inside)."""
    hidden = {"lease_owner", "lease_seconds", "lease_expires_at", "heartbeat_at", "idempotency_key", "enqueued_at"}
    return {k: v for k, v in job.items() if k not in hidden}


def public_model(model: dict[str, Any]) -> dict[str, Any]:
    meta = dict(model.get("meta") or {})
    meta.pop("path", None)
    return {**meta, "id": model["id"], "job_id": model.get("job_id"), "created_at": model.get("created_at")}


def public_dataset(ds: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ds.items() if k != "path"}


def public_checkpoint(ck: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ck.items() if k != "path"}


async def save_upload(upload: UploadFile, dest: Path) -> int:
    """Copy an upload (already spooled by the form parser) to ``dest`` in chunks; returns its size."""
    size = 0
    with open(dest, "wb") as out:
        while chunk := await upload.read(UPLOAD_CHUNK):
            size += len(chunk)
            await run_in_threadpool(out.write, chunk)
    return size


def remove_stale_uploads(tmp_dir: Path, older_than_s: float = 3600.0) -> None:
    """Delete upload folders left by a crashed API. Only old ones: another API process sharing the data
    folder may be receiving an upload right now."""
    if not tmp_dir.is_dir():
        return
    now = time.time()
    for entry in tmp_dir.iterdir():
        try:
            if now - entry.stat().st_mtime > older_than_s:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def decode_image(data: bytes, max_pixels: int) -> Any:
    """The decoded RGB image (EXIF orientation applied) or ``deploy.runtime.ImageError``."""
    from deploy.runtime import load_image

    return load_image(data, max_pixels=max_pixels)


class _Services:
    """What the routes share: settings, store, caches and metrics (one per app)."""

    def __init__(self, settings: Settings, store: Store, max_batch: int, max_wait_s: float, cache_size: int):
        self.settings, self.store = settings, store
        self._registry: Any = None
        self.metrics = Metrics(store.count_jobs_by_state)
        self.tmp_dir = settings.data_dir / "tmp"
        self.predictors = PredictorCache(
            self._load_predictor,
            capacity=cache_size,
            max_batch=max_batch,
            max_wait_s=max_wait_s,
            on_batch=self.metrics.batch_size.observe,
        )

    @property
    def registry(self) -> Any:
        if self._registry is None:
            from deploy.registry import Registry

            self._registry = Registry(self.settings.models_dir)
        return self._registry

    def _load_predictor(self, model_id: str) -> Any:
        from deploy.runtime import Predictor

        # Predictor checks model.onnx against the sha256 in model.json (a tampered model is refused).
        # No spinning: between requests ORT's idle threads would otherwise burn the cores that HTTP
        # handling and image decoding need (measured: about twice the /detect throughput without it).
        return Predictor(self.registry.path(model_id), max_pixels=self.settings.max_image_pixels,
                         session_config={"session.intra_op.allow_spinning": "0",
                                         "session.inter_op.allow_spinning": "0"})

    def work_dir(self) -> Path:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="upload-", dir=self.tmp_dir))


# --------------------------------------------------------------------------------------------------
# The app


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    max_batch: int = 16,
    max_wait_ms: float = 4.0,
    cache_size: int = 4,
) -> FastAPI:
    """Build the API. Without arguments everything comes from ``LDD_*`` environment variables."""
    settings = settings or Settings.from_env()
    settings.make_dirs()
    store = store or Store(settings.store_url)
    svc = _Services(settings, store, max_batch, max_wait_ms / 1000, cache_size)
    remove_stale_uploads(svc.tmp_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await svc.predictors.close()

    app = FastAPI(
        title="LD service",
        version="0.1.0",
        summary="Localization Distillation (LD + VLR) for dense object detectors: train, distil, export, serve.",
        description=(
            "Upload a dataset, submit `train` or `distill` jobs, follow them (poll or server-sent events), "
            "and call `/detect` on the published ONNX students. Errors are "
            '`{"error": {"code", "message", "details"}}`. With API keys configured every endpoint but '
            "`/healthz`, `/readyz` and `/metrics` needs `Authorization: Bearer <key>`."
        ),
        lifespan=lifespan,
        responses={422: _ERRORS[422]},
    )
    app.state.services = svc
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(LatencyMiddleware, metrics=svc.metrics)

    def require_key(creds: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        keys = settings.api_keys
        if not keys:
            return
        token = (creds.credentials if creds else "").encode()
        if not any(hmac.compare_digest(token, k.encode()) for k in keys):
            raise APIError(
                401,
                "unauthorized",
                "missing or wrong API key: send 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    secured = [Depends(require_key)]
    health = APIRouter(tags=["health"])
    v1 = APIRouter(prefix="/v1", dependencies=secured, responses={401: _ERRORS[401]})
    detect_root = APIRouter(dependencies=secured, tags=["detect"], responses={401: _ERRORS[401]})

    # ---------------------------------------------------------------------------------- health

    @health.get("/healthz", response_model=schemas.Health, summary="Liveness")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "checks": {}}

    @health.get(
        "/readyz",
        response_model=schemas.Health,
        summary="Readiness: store and broker reachable, newest model loadable",
        responses={503: {"model": schemas.Health, "description": "not ready; checks say why"}},
    )
    async def readyz() -> Response:
        checks: dict[str, Any] = {}
        checks["store"] = "ok" if await run_in_threadpool(store.ping) else "unreachable"
        checks["broker"] = "ok" if await run_in_threadpool(broker_ok, settings) else "unreachable"
        newest = await run_in_threadpool(store.newest_model)
        if newest is None:
            checks["model"] = "none published"
        else:
            try:
                await svc.predictors.get(newest["id"])
                checks["model"] = f"ok ({newest['id']})"
            except Exception as e:
                checks["model"] = f"cannot load {newest['id']}: {e}"
        ok = checks["store"] == "ok" and checks["broker"] == "ok" and not checks["model"].startswith("cannot")
        body = {"status": "ok" if ok else "unavailable", "checks": checks}
        return Response(json.dumps(body), status_code=200 if ok else 503, media_type="application/json")

    @health.get("/metrics", summary="Prometheus metrics", response_class=Response,
                responses={200: {"content": {CONTENT_TYPE: {}}}})  # fmt: skip
    async def metrics() -> Response:
        body = await run_in_threadpool(svc.metrics.render)
        return Response(body, media_type=CONTENT_TYPE)

    # -------------------------------------------------------------------------------- datasets

    @v1.post(
        "/datasets",
        status_code=201,
        response_model=schemas.Dataset,
        tags=["datasets"],
        summary="Upload a dataset (zip: COCO JSON + images, or Pascal VOC XML + images)",
        responses={400: _ERRORS[400], 413: _ERRORS[413], 422: _ERRORS[422]},
    )
    async def upload_dataset(
        file: Annotated[UploadFile, File(description="a .zip with one COCO JSON file or VOC XML files, and images")],
        name: Annotated[str | None, Form(max_length=200, description="a name for humans")] = None,
    ) -> dict[str, Any]:
        work = svc.work_dir()
        try:
            archive = work / "upload.zip"
            await save_upload(file, archive)
            limits = ZipLimits(max_total_bytes=max(4 * settings.max_upload_bytes, 64 << 20))
            try:
                imported = await run_in_threadpool(import_dataset, archive, work, limits, settings.max_image_pixels)
            except UploadError as e:
                raise APIError(e.status, e.code, e.message, e.details) from e
            dataset_id = new_id("ds")
            final = await run_in_threadpool(publish_dataset, imported, settings.datasets_dir, dataset_id)
            ds_name = name or Path(file.filename or "dataset").stem or "dataset"
            try:
                row = await run_in_threadpool(
                    store.add_dataset, dataset_id, ds_name, str(final), imported.classes,
                    imported.num_images, imported.num_boxes, imported.splits, imported.problems,
                )  # fmt: skip
            except Exception:
                remove_tree(final)
                raise
            return {**public_dataset(row), "format": imported.format}
        finally:
            await run_in_threadpool(remove_tree, work)

    @v1.get("/datasets", response_model=schemas.DatasetList, tags=["datasets"], summary="List datasets")
    def list_datasets() -> dict[str, Any]:
        return {"datasets": [public_dataset(d) for d in store.list_datasets()]}

    @v1.get("/datasets/{dataset_id}", response_model=schemas.Dataset, tags=["datasets"],
            summary="Describe a dataset", responses={404: _ERRORS[404]})  # fmt: skip
    def get_dataset(dataset_id: Annotated[str, PathParam(max_length=64)]) -> dict[str, Any]:
        ds = store.get_dataset(dataset_id)
        if ds is None:
            raise APIError(404, "not_found", f"no dataset {dataset_id!r}")
        return public_dataset(ds)

    # ----------------------------------------------------------------------------- checkpoints

    @v1.post(
        "/checkpoints",
        status_code=201,
        response_model=schemas.Checkpoint,
        tags=["checkpoints"],
        summary="Upload a teacher checkpoint (ours or mmdetection's GFL); read without unpickling code",
        responses={413: _ERRORS[413], 422: _ERRORS[422]},
    )
    async def upload_checkpoint(
        file: Annotated[UploadFile, File(description="a .pt/.pth file written by torch.save")],
        name: Annotated[str | None, Form(max_length=200)] = None,
    ) -> dict[str, Any]:
        work = svc.work_dir()
        try:
            tmp = work / "checkpoint.pt"
            await save_upload(file, tmp)
            try:
                arch = await run_in_threadpool(describe_checkpoint, tmp)
            except CheckpointError as e:
                raise APIError(422, "invalid_checkpoint", str(e)) from e
            ckpt_id = new_id("ckpt")
            settings.checkpoints_dir.mkdir(parents=True, exist_ok=True)
            final = settings.checkpoints_dir / f"{ckpt_id}.pt"
            os.rename(tmp, final)
            try:
                row = await run_in_threadpool(store.add_checkpoint, ckpt_id, str(final), arch, name or file.filename)
            except Exception:
                final.unlink(missing_ok=True)
                raise
            return public_checkpoint(row)
        finally:
            await run_in_threadpool(remove_tree, work)

    @v1.get("/checkpoints/{checkpoint_id}", response_model=schemas.Checkpoint, tags=["checkpoints"],
            summary="Describe an uploaded checkpoint", responses={404: _ERRORS[404]})  # fmt: skip
    def get_checkpoint(checkpoint_id: Annotated[str, PathParam(max_length=64)]) -> dict[str, Any]:
        ck = store.get_checkpoint(checkpoint_id)
        if ck is None:
            raise APIError(404, "not_found", f"no checkpoint {checkpoint_id!r}")
        return public_checkpoint(ck)

    # ------------------------------------------------------------------------------------ jobs

    @v1.post(
        "/jobs",
        status_code=202,
        response_model=schemas.Job,
        tags=["jobs"],
        summary="Submit a train or distill job",
        description=(
            "Validated against the job spec (unknown fields are refused), the dataset and teacher must exist "
            "and the teacher must match the student (classes, reg_max, strides). Returns 202 with the queued "
            "job. With `Idempotency-Key`, the same key and body return the same job (header "
            "`Idempotent-Replayed: true`); the same key with another body is refused (422)."
        ),
        responses={400: _ERRORS[400], 422: _ERRORS[422]},
    )
    def submit_job(
        spec: Annotated[JobSpec, Body(openapi_examples=_JOB_EXAMPLES)],
        response: Response,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
    ) -> dict[str, Any]:
        check_job(spec, store, settings)
        body = spec.model_dump(mode="json")
        try:
            job, created = store.create_job(body, idempotency_key=idempotency_key)
        except IdempotencyConflict as e:
            raise APIError(422, "idempotency_conflict", str(e), {"job_id": e.job_id}) from e
        if created:
            # Best effort: if the broker is down, the worker's recovery loop re-sends queued jobs from the store.
            enqueue(job["id"], settings)
        else:
            response.headers["Idempotent-Replayed"] = "true"
        return public_job(job)

    @v1.get("/jobs", response_model=schemas.JobList, tags=["jobs"], summary="List jobs, newest first")
    def list_jobs(
        state: Annotated[JobState | None, Query(description="only jobs in this state")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        return {"jobs": [public_job(j) for j in store.list_jobs(state=state, limit=limit)]}

    def _job_or_404(job_id: str) -> dict[str, Any]:
        job = store.get_job(job_id)
        if job is None:
            raise APIError(404, "not_found", f"no job {job_id!r}")
        return job

    @v1.get("/jobs/{job_id}", response_model=schemas.Job, tags=["jobs"],
            summary="A job: state, progress, metrics, model_id, error", responses={404: _ERRORS[404]})  # fmt: skip
    def get_job(job_id: Annotated[str, PathParam(max_length=64)]) -> dict[str, Any]:
        return public_job(_job_or_404(job_id))

    @v1.post(
        "/jobs/{job_id}/cancel",
        response_model=schemas.Job,
        tags=["jobs"],
        summary="Cancel a queued or running job",
        description="A queued job is cancelled at once; a running one is stopped by its worker within seconds.",
        responses={404: _ERRORS[404], 409: {"model": ErrorResponse, "description": "the job already ended"}},
    )
    def cancel_job(job_id: Annotated[str, PathParam(max_length=64)]) -> dict[str, Any]:
        job = _job_or_404(job_id)
        if job["state"] in TERMINAL_STATES:
            raise APIError(409, "job_finished", f"job {job_id} already ended ({job['state']})")
        return public_job(store.request_cancel(job_id))

    @v1.get(
        "/jobs/{job_id}/events",
        tags=["jobs"],
        summary="Server-sent events with the job's progress until it ends",
        description=(
            "`event: job` with the job JSON whenever it changes, then `event: end` with the final job. "
            "Comment lines keep the connection alive."
        ),
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}, 404: _ERRORS[404]},
    )
    async def job_events(
        job_id: Annotated[str, PathParam(max_length=64)],
        request: Request,
        interval: Annotated[float, Query(ge=0.1, le=10, description="polling period in seconds")] = 0.5,
    ) -> StreamingResponse:
        await run_in_threadpool(_job_or_404, job_id)

        async def stream() -> AsyncIterator[str]:
            last, n, quiet_since = None, 0, time.monotonic()
            while True:
                job = await run_in_threadpool(store.get_job, job_id)
                if job is None:
                    return
                pub = public_job(job)
                # Heartbeats touch updated_at every few seconds; only what a client cares about counts.
                key = json.dumps([pub.get(k) for k in _EVENT_FIELDS], sort_keys=True)
                if key != last:
                    last, n, quiet_since = key, n + 1, time.monotonic()
                    yield f"id: {n}\nevent: job\ndata: {json.dumps(pub)}\n\n"
                if pub["state"] in TERMINAL_STATES:
                    yield f"id: {n + 1}\nevent: end\ndata: {json.dumps(pub)}\n\n"
                    return
                if time.monotonic() - quiet_since > 15:
                    quiet_since = time.monotonic()
                    yield ": keep-alive\n\n"
                if await request.is_disconnected():
                    return
                await asyncio.sleep(interval)

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    # ---------------------------------------------------------------------------------- models

    def _model_or_404(model_id: str) -> dict[str, Any]:
        m = store.get_model(model_id)
        if m is None:
            raise APIError(404, "not_found", f"no model {model_id!r}")
        return m

    @v1.get("/models", response_model=schemas.ModelList, tags=["models"], summary="Published models, newest first")
    def list_models() -> dict[str, Any]:
        return {"models": [public_model(m) for m in store.list_models()]}

    @v1.get("/models/{model_id}", response_model=schemas.Model, tags=["models"],
            summary="A published model: classes, input size, metrics, source job, sha256",
            responses={404: _ERRORS[404]})  # fmt: skip
    def get_model(model_id: Annotated[str, PathParam(max_length=64)]) -> dict[str, Any]:
        return public_model(_model_or_404(model_id))

    @v1.get(
        "/models/{model_id}/onnx",
        tags=["models"],
        summary="Download the model's ONNX file",
        response_class=FileResponse,
        responses={200: {"content": {"application/octet-stream": {}}}, 404: _ERRORS[404]},
    )
    def get_model_onnx(model_id: Annotated[str, PathParam(max_length=64)]) -> FileResponse:
        _model_or_404(model_id)
        path = svc.registry.path(model_id) / "model.onnx"
        if not path.is_file():
            raise APIError(404, "not_found", f"model {model_id!r} has no ONNX file")
        return FileResponse(path, media_type="application/octet-stream", filename=f"{model_id}.onnx")

    # ---------------------------------------------------------------------------------- detect

    async def run_detect(request: Request, model_id: str | None, score_threshold: float | None) -> dict[str, Any]:
        start = time.perf_counter()
        data, body_model, body_threshold = await read_detect_body(request)
        model_id = model_id or body_model
        threshold = score_threshold if score_threshold is not None else body_threshold
        if model_id is None:
            newest = await run_in_threadpool(store.newest_model)
            if newest is None:
                raise APIError(404, "no_model", "no model is published yet: run a job first")
            model_id = newest["id"]
        elif await run_in_threadpool(store.get_model, model_id) is None:
            raise APIError(404, "not_found", f"no model {model_id!r}")
        try:
            _, batcher = await svc.predictors.get(model_id)
        except Exception as e:
            log.exception("cannot load model %s", model_id)
            raise APIError(503, "model_unavailable", f"model {model_id} cannot be loaded: {e}") from e
        from deploy.runtime import ImageError

        try:
            image = await run_in_threadpool(decode_image, data, settings.max_image_pixels)
            detections = await batcher.submit(image)
        except ImageError as e:
            raise APIError(400, "bad_image", str(e)) from e
        if threshold is not None:
            detections = [d for d in detections if d["score"] >= threshold]
        w, h = image_size(image)
        return {
            "model": model_id,
            "image_size": [w, h],
            "detections": detections,
            "latency_ms": round((time.perf_counter() - start) * 1000, 3),
        }

    detect_doc = dict(
        response_model=schemas.DetectResponse,
        openapi_extra=_DETECT_BODY,
        responses={400: _ERRORS[400], 404: _ERRORS[404], 413: _ERRORS[413], 415: {"model": ErrorResponse}},
    )

    @v1.post("/models/{model_id}/detect", tags=["detect"], summary="Detect objects with this model", **detect_doc)
    async def detect_with_model(
        model_id: Annotated[str, PathParam(max_length=64)],
        request: Request,
        score_threshold: Annotated[float | None, Query(ge=0, le=1)] = None,
    ) -> dict[str, Any]:
        return await run_detect(request, model_id, score_threshold)

    @detect_root.post("/detect", summary="Detect objects with the newest (or the given) model", **detect_doc)
    async def detect(
        request: Request,
        model: Annotated[str | None, Query(max_length=64, description="model id; default: the newest")] = None,
        score_threshold: Annotated[float | None, Query(ge=0, le=1)] = None,
    ) -> dict[str, Any]:
        return await run_detect(request, model, score_threshold)

    app.include_router(health)
    app.include_router(v1)
    app.include_router(detect_root)
    return app


def image_size(image: Any) -> tuple[int, int]:
    if hasattr(image, "size") and isinstance(image.size, tuple):  # PIL
        return int(image.size[0]), int(image.size[1])
    h, w = image.shape[:2]  # numpy HWC
    return int(w), int(h)


async def read_detect_body(request: Request) -> tuple[bytes, str | None, float | None]:
    """``(image bytes, model, score_threshold)`` from a multipart form or a JSON body."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=1, max_fields=10)
        except MultiPartException as e:
            raise APIError(400, "bad_request", f"cannot parse the form: {e.message}") from e
        upload = form.get("file")
        if not isinstance(upload, FormFile):
            raise APIError(422, "invalid_request", "file: an image file is required (form field 'file')")
        data = await upload.read()
        model = form.get("model")
        raw_thr = form.get("score_threshold")
        try:
            fields = schemas.DetectJSON.model_validate(
                {"image": "", "model": model if isinstance(model, str) and model else None,
                 "score_threshold": raw_thr if isinstance(raw_thr, str) and raw_thr else None}
            )  # fmt: skip
        except ValidationError as e:
            raise _invalid(e) from e
        return data, fields.model, fields.score_threshold
    if ctype == "application/json" or ctype.endswith("+json"):
        raw = await request.body()
        try:
            payload = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, "malformed_json", f"the request body is not valid JSON: {e}") from e
        try:
            body = schemas.DetectJSON.model_validate(payload)
        except ValidationError as e:
            raise _invalid(e) from e
        try:
            data = base64.b64decode(body.image, validate=True)
        except (binascii.Error, ValueError) as e:
            raise APIError(400, "bad_image", f"image: not valid base64 ({e})") from e
        return data, body.model, body.score_threshold
    raise APIError(
        415,
        "unsupported_media_type",
        "send the image as multipart/form-data (field 'file') or as JSON {\"image\": base64}",
    )


def _invalid(e: ValidationError) -> APIError:
    details = [
        {"field": ".".join(str(p) for p in err["loc"]) or None, "message": err["msg"], "type": err["type"]}
        for err in e.errors()
    ]
    return APIError(422, "invalid_request", validation_message(details), details)


# --------------------------------------------------------------------------------------------------
# Job checks that need the store (the spec itself is validated by pydantic before we get here)


def check_job(spec: JobSpec, store: Store, settings: Settings) -> None:
    """Refuse (422) a job the worker could not run: unknown dataset, teacher unknown or unfinished,
    teacher/student mismatch. The same checks as the worker's (``worker.resolve``), before queueing."""
    ds = store.get_dataset(spec.dataset)
    if ds is None:
        raise APIError(422, "unknown_dataset", f"dataset: no dataset {spec.dataset!r} (upload one to /v1/datasets)")
    if spec.teacher is None:
        return
    if spec.teacher.path:
        raise APIError(
            422,
            "invalid_request",
            "teacher.path is for local runs only; give teacher.model, teacher.job or teacher.checkpoint",
        )
    try:
        _, facts = teacher_checkpoint(spec.teacher.model_dump(), store, settings)
    except JobRefused as e:
        raise APIError(422, "invalid_teacher", f"teacher: {e}") from e
    if problem := teacher_mismatch(facts, ds["classes"]):
        raise APIError(422, "teacher_mismatch", problem)

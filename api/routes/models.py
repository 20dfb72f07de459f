"""``/v1/models``: the published students (the store's catalogue) and their ONNX files; ``POST`` publishes an
uploaded detector checkpoint as it is, without training (``core.served_checkpoints``: an ``export`` job)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from api import schemas
from api.deps import (
    IN_USE,
    CallerDep,
    IdempotencyKey,
    ResourceId,
    ServicesDep,
    SettingsDep,
    StoreDep,
    delete_or_409,
    get_or_404,
)
from api.errors import APIError, error_docs
from api.presenters import public_job, public_model
from core import deletion
from core.queue import enqueue
from core.served_checkpoints import create_export_job
from core.store import IdempotencyConflict, TooManyActiveJobs
from distill.spec import ExportSpec

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=schemas.ModelList, summary="Published models, newest first")
def list_models(store: StoreDep, caller: CallerDep) -> dict[str, Any]:
    return {"models": [public_model(m) for m in store.list_models(tenant=caller.scope)]}


class PublishCheckpoint(BaseModel):
    """A detector checkpoint uploaded with ``POST /v1/checkpoints``, to publish as it is (no training)."""

    model_config = ConfigDict(extra="forbid")
    checkpoint: str = Field(..., description="an uploaded detector checkpoint's id", examples=["ckpt_5e6f7a8b9c0d"])
    name: str | None = Field(None, max_length=200, description="the model's name (default: the checkpoint's)")
    export: ExportSpec = Field(default_factory=ExportSpec, description="the formats to publish (fp32 always)")


@router.post("", status_code=202, response_model=schemas.Job, responses=error_docs(400, 404, 422, 429),
             summary="Publish an uploaded detector checkpoint as a model without training: mmdetection's RetinaNet, "
                     "FCOS or ATSS with its own decoding, a GFL, or one of ours. Answers the export job; its "
                     "model_id is the model once it succeeded (the worker exports it: torch runs there)")  # fmt: skip
def publish_checkpoint(
    body: PublishCheckpoint,
    response: Response,
    store: StoreDep,
    settings: SettingsDep,
    caller: CallerDep,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    ck = get_or_404(store.get_checkpoint, "checkpoint", body.checkpoint, caller.scope)
    arch = ck.get("arch") or {}
    if arch.get("kind") != "detector":
        raise APIError(422, "not_a_detector", f"checkpoint {body.checkpoint} holds a {arch.get('kind')}, not a "
                       "detector: only a detector can be served")  # fmt: skip
    try:
        job, created = create_export_job(store, settings, ck, name=body.name or ck.get("name"),
                                         formats=body.export.formats, tenant=caller.tenant,
                                         idempotency_key=idempotency_key)  # fmt: skip
    except IdempotencyConflict as e:
        raise APIError(422, "idempotency_conflict", str(e), {"job_id": e.job_id}) from e
    except TooManyActiveJobs as e:
        raise APIError(429, "too_many_active_jobs", str(e), {"active": e.active, "limit": e.limit}) from e
    if created:
        enqueue(job["id"], settings, spec=job["spec"])  # best effort: the recovery loop re-sends a lost message
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return public_job(job)


@router.get("/{model_id}", response_model=schemas.Model,
            summary="A published model: classes, input size, format, metrics measured by the runtime that serves "
                    "it, source job, sha256, and the backend and providers that serve it here",
            responses=error_docs(404))  # fmt: skip
def get_model(model_id: ResourceId, store: StoreDep, caller: CallerDep, services: ServicesDep) -> dict[str, Any]:
    return {
        **public_model(get_or_404(store.get_model, "model", model_id, caller.scope)),
        "serving": services.serving(model_id),
    }


@router.get(
    "/{model_id}/onnx",
    summary="Download the model's ONNX file",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, **error_docs(404)},
)
def get_model_onnx(model_id: ResourceId, store: StoreDep, services: ServicesDep, caller: CallerDep) -> FileResponse:
    get_or_404(store.get_model, "model", model_id, caller.scope)
    try:
        path = services.model_dir(model_id) / "model.onnx"
    except FileNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise APIError(404, "not_found", f"model {model_id!r} has no ONNX file")
    return FileResponse(path, media_type="application/octet-stream", filename=f"{model_id}.onnx")


@router.delete("/{model_id}", status_code=204, response_class=Response, responses={**error_docs(404), **IN_USE},
               summary="Delete a published model (with its other formats) and its files (409 while a deployment "
                       "serves it or a queued or running job uses it)")  # fmt: skip
def delete_model(model_id: ResourceId, store: StoreDep, services: ServicesDep, caller: CallerDep) -> Response:
    get_or_404(store.get_model, "model", model_id, caller.scope)
    return delete_or_409(deletion.delete_model, store, services.settings, model_id, caller.tenant)

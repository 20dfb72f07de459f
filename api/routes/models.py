"""``/v1/models``: the published students (the store's catalogue) and their ONNX files."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse

from api import schemas
from api.deps import IN_USE, CallerDep, RegistryDep, ResourceId, ServicesDep, StoreDep, delete_or_409, get_or_404
from api.errors import APIError, error_docs
from api.presenters import public_model
from core import deletion

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=schemas.ModelList, summary="Published models, newest first")
def list_models(store: StoreDep, caller: CallerDep) -> dict[str, Any]:
    return {"models": [public_model(m) for m in store.list_models(tenant=caller.scope)]}


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
def get_model_onnx(model_id: ResourceId, store: StoreDep, registry: RegistryDep, caller: CallerDep) -> FileResponse:
    get_or_404(store.get_model, "model", model_id, caller.scope)
    path = registry.path(model_id) / "model.onnx"
    if not path.is_file():
        raise APIError(404, "not_found", f"model {model_id!r} has no ONNX file")
    return FileResponse(path, media_type="application/octet-stream", filename=f"{model_id}.onnx")


@router.delete("/{model_id}", status_code=204, response_class=Response, responses={**error_docs(404), **IN_USE},
               summary="Delete a published model (with its other formats) and its files (409 while a deployment "
                       "serves it or a queued or running job uses it)")  # fmt: skip
def delete_model(model_id: ResourceId, store: StoreDep, services: ServicesDep, caller: CallerDep) -> Response:
    get_or_404(store.get_model, "model", model_id, caller.scope)
    return delete_or_409(deletion.delete_model, store, services.settings, model_id, caller.tenant)

"""``/v1/deployments``: a tenant's stable name for the model that serves it (``core.deployments``), with its
versions, a rollback, and ``/detect`` through the name.

A switch (create, update, rollback) loads the new model and runs it once before the store's pointer moves
(``Services.warm``), so the first request after it pays nothing extra. Each request reads the pointer once, as it
starts: requests in flight finish on the model they started with (its batcher stays loaded while it holds
requests, ``api.batcher.PredictorCache``), new ones go to the new model, and none fails across the switch.

Names are the caller's tenant's own (another tenant's ``blood-cells`` is a 404 here, and theirs to reuse).
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Request, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field

from api.deps import ID_PATTERN, CallerDep, Services, ServicesDep
from api.detect_body import DetectBody
from api.errors import APIError, ErrorResponse, error_docs
from api.routes.detect import DETECT_DOC, Threshold, Timeout, deployed_model, serve, visible_model
from core import deployments
from core.tenants import Caller

log = logging.getLogger("ldd.api")

router = APIRouter(prefix="/v1/deployments", tags=["deployments"])

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
Name = Annotated[str, PathParam(max_length=64, pattern=NAME_PATTERN)]
_WHY_409 = "the name is taken, the models are incompatible, there is no earlier version, or it changed meanwhile"
_CONFLICT: dict[int | str, dict[str, Any]] = {409: {"model": ErrorResponse, "description": _WHY_409}}
_MODEL = Field(..., max_length=64, pattern=ID_PATTERN, description="a published model's id")


class DeploymentCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., max_length=64, pattern=NAME_PATTERN, examples=["blood-cells"])
    model: str = _MODEL


class DeploymentUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = _MODEL


class Version(BaseModel):
    version: int
    model_id: str
    created_at: str
    created_by: str = Field(..., description="the key name (tenant) that made this version")


class Deployment(BaseModel):
    name: str
    tenant: str
    version: int = Field(..., description="the current version")
    model_id: str = Field(..., description="the model the current version serves")
    created_at: str
    updated_at: str
    updated_by: str
    history: list[Version] = Field(..., description="every version, newest first")


class DeploymentSummary(BaseModel):
    name: str
    tenant: str
    version: int
    model_id: str
    updated_at: str
    updated_by: str


class DeploymentList(BaseModel):
    deployments: list[DeploymentSummary]


@router.post("", status_code=201, response_model=Deployment, summary="Name a model: version 1 of a deployment",
             responses={**error_docs(400, 404, 422), **_CONFLICT})  # fmt: skip
async def create_deployment(body: DeploymentCreate, services: ServicesDep, caller: CallerDep) -> dict[str, Any]:
    await visible_model(services, body.model, caller)
    await _warm(services, body.model)
    try:
        dep = await run_in_threadpool(deployments.create, services.store, caller.tenant, body.name, body.model,
                                      caller.tenant)  # fmt: skip
    except deployments.Conflict as e:
        raise APIError(409, "deployment_exists", str(e)) from e
    log.info("deployment %s/%s created: v1 -> %s", caller.tenant, body.name, body.model)
    return dep


@router.get("", response_model=DeploymentList, summary="The caller's deployments and what each serves")
def list_deployments(services: ServicesDep, caller: CallerDep) -> dict[str, Any]:
    return {"deployments": deployments.list_all(services.store, caller.tenant)}


@router.get("/{name}", response_model=Deployment, summary="A deployment: its current version and history",
            responses=error_docs(404))  # fmt: skip
def get_deployment(name: Name, services: ServicesDep, caller: CallerDep) -> dict[str, Any]:
    return _deployment(services, name, caller)


@router.put("/{name}", response_model=Deployment, summary="Serve another model: a new version, switched atomically",
            responses={**error_docs(400, 404, 422), **_CONFLICT})  # fmt: skip
async def update_deployment(
    name: Name, body: DeploymentUpdate, services: ServicesDep, caller: CallerDep
) -> dict[str, Any]:
    dep = await run_in_threadpool(_deployment, services, name, caller)
    new = await visible_model(services, body.model, caller)
    current = await run_in_threadpool(services.store.get_model, dep["model_id"])
    if current is not None and (reason := deployments.incompatibility(current, new)):
        raise APIError(409, "incompatible_model", f"{name} cannot serve {body.model}: {reason}")
    await _warm(services, body.model)
    try:
        dep = await run_in_threadpool(deployments.update_to, services.store, caller.tenant, name, body.model,
                                      caller.tenant, dep["version"])  # fmt: skip
    except deployments.Conflict as e:
        raise APIError(409, "deployment_changed", str(e)) from e
    log.info("deployment %s/%s: v%d -> %s (by %s)", caller.tenant, name, dep["version"], body.model, caller.tenant)
    return dep


@router.post("/{name}/rollback", response_model=Deployment, summary="Return to the version before the current one",
             responses={**error_docs(404), **_CONFLICT})  # fmt: skip
async def rollback_deployment(name: Name, services: ServicesDep, caller: CallerDep) -> dict[str, Any]:
    dep = await run_in_threadpool(_deployment, services, name, caller)
    target = deployments.previous(dep)
    if target is None:
        raise APIError(409, "no_previous_version", f"{name} is at its first version (v{dep['version']})")
    if await run_in_threadpool(services.store.get_model, target["model_id"]) is None:
        raise APIError(409, "model_deleted", f"v{target['version']} served {target['model_id']}, which was deleted")
    await _warm(services, target["model_id"])
    try:
        dep = await run_in_threadpool(deployments.rollback_to, services.store, caller.tenant, name,
                                      target["version"], caller.tenant, dep["version"])  # fmt: skip
    except deployments.Conflict as e:
        raise APIError(409, "deployment_changed", str(e)) from e
    log.info("deployment %s/%s rolled back to v%d (%s)", caller.tenant, name, dep["version"], dep["model_id"])
    return dep


@router.delete("/{name}", status_code=204, summary="Delete a deployment and its history (not its models)",
               responses=error_docs(404))  # fmt: skip
def delete_deployment(name: Name, services: ServicesDep, caller: CallerDep) -> Response:
    if not deployments.remove(services.store, caller.tenant, name):
        raise APIError(404, "not_found", f"no deployment {name!r}")
    log.info("deleted deployment %s (tenant %s)", name, caller.tenant)
    return Response(status_code=204)


@router.post("/{name}/detect", summary="Detect objects with the model this deployment serves now", **DETECT_DOC)
async def detect_with_deployment(
    name: Name,
    request: Request,
    services: ServicesDep,
    caller: CallerDep,
    score_threshold: Threshold = None,
    timeout_ms: Timeout = None,
) -> dict[str, Any]:
    async def resolve(body: DetectBody) -> tuple[str, str]:
        return await deployed_model(services, caller, name, APIError(404, "not_found", f"no deployment {name!r}")), name

    return await serve(request, services, resolve, score_threshold, timeout_ms)


def _deployment(services: Services, name: str, caller: Caller) -> dict[str, Any]:
    dep = deployments.get(services.store, caller.tenant, name)
    if dep is None:
        raise APIError(404, "not_found", f"no deployment {name!r}")
    return dep


async def _warm(services: Services, model_id: str) -> None:
    try:
        await services.warm(model_id)
    except Exception as e:
        log.exception("cannot load model %s", model_id)
        raise APIError(503, "model_unavailable", f"model {model_id} cannot be loaded: {e}") from e

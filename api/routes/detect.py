"""``POST /v1/models/{model_id}/detect`` and ``POST /detect``: the named model, else ``LDD_DEFAULT_DEPLOYMENT``'s,
else the caller's newest. :func:`serve` (reading the upload, then :func:`answer`) also serves
``POST /v1/deployments/{name}/detect``.

The image is decoded once, here, in a worker thread (bad images are refused before they reach a batch);
the model's micro-batcher (``api.batcher``) then runs it with the requests that arrived beside it. A full
batcher answers 503 with ``Retry-After`` at once; ``X-Request-Timeout-Ms`` sets a deadline past which the
request is dropped with 504.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool

from api import schemas
from api.batcher import DeadlineExceeded, Overloaded
from api.deps import ID_PATTERN, CallerDep, ResourceId, Services, ServicesDep, get_or_404
from api.detect_body import DETECT_OPENAPI, DetectBody, read_detect_body
from api.errors import APIError, ErrorResponse, error_docs
from core import deployments
from core.tenants import Caller
from deploy.runtime import ImageError, load_image

log = logging.getLogger("ldd.api")

router = APIRouter(tags=["detect"])

DETECT_DOC: dict[str, Any] = dict(
    response_model=schemas.DetectResponse,
    openapi_extra=DETECT_OPENAPI,
    responses={**error_docs(400, 404, 413, 503, 504), 415: {"model": ErrorResponse}},
)
Threshold = Annotated[float | None, Query(ge=0, le=1)]
Timeout = Annotated[
    int | None,
    Header(alias="X-Request-Timeout-Ms", ge=1, le=3_600_000, description="answer 504 if not served within this"),
]


@router.post("/v1/models/{model_id}/detect", summary="Detect objects with this model", **DETECT_DOC)
async def detect_with_model(
    model_id: ResourceId,
    request: Request,
    services: ServicesDep,
    caller: CallerDep,
    score_threshold: Threshold = None,
    timeout_ms: Timeout = None,
) -> dict[str, Any]:
    async def resolve(body: DetectBody) -> tuple[str, None]:
        await visible_model(services, model_id, caller)
        return model_id, None

    return await serve(request, services, resolve, score_threshold, timeout_ms)


@router.post("/detect", summary="Detect objects with the given model, the default deployment or the newest model",
             **DETECT_DOC)  # fmt: skip
async def detect(
    request: Request,
    services: ServicesDep,
    caller: CallerDep,
    model: Annotated[
        str | None, Query(max_length=64, pattern=ID_PATTERN, description="model id; default: the caller's newest")
    ] = None,
    score_threshold: Threshold = None,
    timeout_ms: Timeout = None,
) -> dict[str, Any]:
    async def resolve(body: DetectBody) -> tuple[str, str | None]:
        if (model_id := model or body.model) is not None:  # the query wins over the body
            await visible_model(services, model_id, caller)
            return model_id, None
        if deployment := services.settings.default_deployment:
            why = f"no deployment {deployment!r} (LDD_DEFAULT_DEPLOYMENT) to serve"
            return await deployed_model(services, caller, deployment, APIError(404, "no_deployment", why)), deployment
        newest = await run_in_threadpool(services.store.newest_model, caller.scope)
        if newest is None:
            raise APIError(404, "no_model", "no model is published yet: run a job first")
        return newest["id"], None

    return await serve(request, services, resolve, score_threshold, timeout_ms)


async def serve(
    request: Request,
    services: Services,
    resolve: Callable[[DetectBody], Awaitable[tuple[str, str | None]]],
    score_threshold: float | None,
    timeout_ms: int | None,
) -> dict[str, Any]:
    """What every detect route does (``/detect``, ``/v1/models/{id}/detect``, ``/v1/deployments/{name}/detect``):
    start the request's clock, read its upload (:func:`read_detect_body`: 413, 415, 400 before any lookup), let
    ``resolve`` name the model to run (checked visible to the caller, else its 404) and the deployment it is counted
    under, and :func:`answer` with it."""
    start = time.perf_counter()
    body = await read_detect_body(request)
    model_id, deployment = await resolve(body)
    return await answer(body, services, model_id, deployment, score_threshold, timeout_ms, start)


async def visible_model(services: Services, model_id: str, caller: Caller) -> dict[str, Any]:
    """The model ``model_id`` if the caller may see it, else a 404."""
    return await run_in_threadpool(get_or_404, services.store.get_model, "model", model_id, caller.scope)


async def deployed_model(services: Services, caller: Caller, name: str, missing: APIError) -> str:
    """The model the caller's deployment ``name`` serves now; raises ``missing`` when there is no such deployment."""
    model_id = await run_in_threadpool(deployments.current_model, services.store, caller.tenant, name)
    if model_id is None:
        raise missing
    return model_id


async def answer(
    body: DetectBody,
    services: Services,
    model_id: str,
    deployment: str | None,
    score_threshold: float | None,
    timeout_ms: int | None,
    start: float,
) -> dict[str, Any]:
    """Run the request's image (``body``, from :func:`read_detect_body`) through ``model_id`` (already checked
    visible to the caller), counted under ``deployment`` and the model in /metrics."""
    labels = {"deployment": deployment or "", "model": model_id}
    metrics = services.metrics
    metrics.detect_requests.labels(**labels).inc()
    try:
        result = await _answer(body, services, model_id, score_threshold, timeout_ms, start, labels)
    except APIError as e:
        if e.status in (503, 504) and e.code in ("overloaded", "deadline_exceeded"):
            metrics.detect_rejected.labels(**labels, reason=e.code).inc()
        else:
            metrics.detect_errors.labels(**labels).inc()
        raise
    except Exception:
        metrics.detect_errors.labels(**labels).inc()
        raise
    metrics.detect_seconds.labels(**labels).observe(time.perf_counter() - start)
    return result


async def _answer(
    body: DetectBody,
    services: Services,
    model_id: str,
    score_threshold: float | None,
    timeout_ms: int | None,
    start: float,
    labels: dict[str, str],
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = None if timeout_ms is None else loop.time() - (time.perf_counter() - start) + timeout_ms / 1000
    threshold = score_threshold if score_threshold is not None else body.score_threshold
    try:
        _, batcher = await services.predictors.get(model_id)
    except Exception as e:
        log.exception("cannot load model %s", model_id)
        raise APIError(503, "model_unavailable", f"model {model_id} cannot be loaded: {e}") from e
    try:
        batcher.check_room()  # before decoding: an overloaded server must refuse cheaply
    except Overloaded as e:
        raise _refusal(e) from e
    try:
        image = await run_in_threadpool(load_image, body.image, services.settings.max_image_pixels)
    except ImageError as e:
        raise APIError(400, "bad_image", str(e)) from e
    gauge = services.metrics.detect_queue.labels(**labels)
    gauge.inc()
    try:
        remaining = None if deadline is None else deadline - loop.time()
        if remaining is not None and remaining <= 0:
            raise DeadlineExceeded("its deadline passed before it was queued")
        detections = await asyncio.wait_for(batcher.submit(image, deadline), remaining)
    except Overloaded as e:
        raise _refusal(e) from e
    except (DeadlineExceeded, TimeoutError) as e:
        raise APIError(504, "deadline_exceeded", f"not served within X-Request-Timeout-Ms={timeout_ms}") from e
    finally:
        gauge.dec()
    if threshold is not None:
        detections = [d for d in detections if d["score"] >= threshold]
    return {
        "model": model_id,
        "image_size": list(image.size),  # width, height
        "detections": detections,
        "latency_ms": round((time.perf_counter() - start) * 1000, 3),
    }


def _refusal(e: Overloaded) -> APIError:
    return APIError(503, "overloaded", f"{e}: retry after {e.retry_after} s", {"queue_depth": e.depth},
                    headers={"Retry-After": str(e.retry_after)})  # fmt: skip

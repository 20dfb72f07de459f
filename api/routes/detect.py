"""``POST /v1/models/{model_id}/detect`` and ``POST /detect`` (the newest model unless ``model`` is given).

The image is decoded once, here, in a worker thread (bad images are refused before they reach a batch);
the model's micro-batcher (``api.batcher``) then runs it with the requests that arrived beside it.
"""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from api import schemas
from api.batcher import PredictorCache
from api.deps import ID_PATTERN, CallerDep, PredictorsDep, ResourceId, SettingsDep, StoreDep, get_or_404
from api.detect_body import DETECT_OPENAPI, read_detect_body
from api.errors import APIError, ErrorResponse, error_docs
from core.settings import Settings
from core.store import Store
from core.tenants import Caller
from deploy.runtime import ImageError, load_image

log = logging.getLogger("ldd.api")

router = APIRouter(tags=["detect"])

_DOC: dict[str, Any] = dict(
    response_model=schemas.DetectResponse,
    openapi_extra=DETECT_OPENAPI,
    responses={**error_docs(400, 404, 413), 415: {"model": ErrorResponse}},
)
Threshold = Annotated[float | None, Query(ge=0, le=1)]


@router.post("/v1/models/{model_id}/detect", summary="Detect objects with this model", **_DOC)
async def detect_with_model(
    model_id: ResourceId,
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    predictors: PredictorsDep,
    caller: CallerDep,
    score_threshold: Threshold = None,
) -> dict[str, Any]:
    return await _detect(request, model_id, score_threshold, store, settings, predictors, caller)


@router.post("/detect", summary="Detect objects with the newest (or the given) model", **_DOC)
async def detect(
    request: Request,
    store: StoreDep,
    settings: SettingsDep,
    predictors: PredictorsDep,
    caller: CallerDep,
    model: Annotated[
        str | None, Query(max_length=64, pattern=ID_PATTERN, description="model id; default: the caller's newest")
    ] = None,
    score_threshold: Threshold = None,
) -> dict[str, Any]:
    return await _detect(request, model, score_threshold, store, settings, predictors, caller)


async def _detect(
    request: Request,
    model_id: str | None,
    score_threshold: float | None,
    store: Store,
    settings: Settings,
    predictors: PredictorCache,
    caller: Caller,
) -> dict[str, Any]:
    start = time.perf_counter()
    body = await read_detect_body(request)
    model_id = model_id or body.model  # the query wins over the body
    threshold = score_threshold if score_threshold is not None else body.score_threshold
    if model_id is None:
        newest = await run_in_threadpool(store.newest_model, caller.scope)
        if newest is None:
            raise APIError(404, "no_model", "no model is published yet: run a job first")
        model_id = newest["id"]
    else:
        await run_in_threadpool(get_or_404, store.get_model, "model", model_id, caller.scope)
    try:
        _, batcher = await predictors.get(model_id)
    except Exception as e:
        log.exception("cannot load model %s", model_id)
        raise APIError(503, "model_unavailable", f"model {model_id} cannot be loaded: {e}") from e
    try:
        image = await run_in_threadpool(load_image, body.image, settings.max_image_pixels)
    except ImageError as e:
        raise APIError(400, "bad_image", str(e)) from e
    detections = await batcher.submit(image)
    if threshold is not None:
        detections = [d for d in detections if d["score"] >= threshold]
    return {
        "model": model_id,
        "image_size": list(image.size),  # width, height
        "detections": detections,
        "latency_ms": round((time.perf_counter() - start) * 1000, 3),
    }

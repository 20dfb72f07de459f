"""``/healthz`` (liveness), ``/readyz`` (readiness) and ``/metrics`` (Prometheus). No API key needed."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from api import schemas
from api.deps import ArtifactsDep, MetricsDep, PredictorsDep, SettingsDep, StoreDep
from api.metrics import CONTENT_TYPE
from api.supervisor import worker_check
from api.uploads import free_bytes
from core.queue import broker_ok
from core.settings import Settings

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=schemas.Health, summary="Liveness")
async def healthz() -> dict[str, Any]:
    return {"status": "ok", "checks": {}}


@router.get(
    "/readyz",
    response_model=schemas.Health,
    summary="Readiness: store, broker and object storage reachable, newest model loadable (and what serves it), "
    "the embedded worker up; free space",
    description="`checks.serving` names the backend (`LDD_BACKEND`) and providers (`LDD_PROVIDERS`) serving the "
    "newest model; `checks.worker` appears under `ldd up` only (its supervisor restarts a worker that dies); "
    "`checks.disk` reports the data folder's free space against `LDD_MIN_FREE_BYTES` (low space refuses "
    "uploads with 507 but does not make the service unready: it still serves).",
    responses={503: {"model": schemas.Health, "description": "not ready; checks say why"}},
)
async def readyz(
    store: StoreDep, settings: SettingsDep, predictors: PredictorsDep, artifacts: ArtifactsDep
) -> Response:
    checks: dict[str, Any] = {}
    checks["store"] = "ok" if await run_in_threadpool(store.ping) else "unreachable"
    checks["broker"] = "ok" if await run_in_threadpool(broker_ok, settings) else "unreachable"
    if artifacts.remote:  # object storage (LDD_STORAGE_URL): where every model and upload lives
        checks["storage"] = await run_in_threadpool(artifacts.ping)
    newest = await run_in_threadpool(store.newest_model)
    if newest is None:
        checks["model"] = "none published"
    else:
        # Loading it here also warms the cache for the first /detect.
        try:
            predictor, _ = await predictors.get(newest["id"])
            checks["model"] = f"ok ({newest['id']})"
            checks["serving"] = {
                "model": newest["id"],
                "backend": predictor.backend,
                "providers": list(predictor.providers),
            }
        except Exception as e:
            checks["model"] = f"cannot load {newest['id']}: {e}"
    worker = await run_in_threadpool(worker_check, settings.data_dir)
    if worker is not None:
        checks["worker"] = worker
    checks["disk"] = await run_in_threadpool(_disk_check, settings)
    ok = checks["store"] == "ok" and checks["broker"] == "ok" and not checks["model"].startswith("cannot")
    ok = ok and checks.get("storage", "ok") == "ok"
    ok = ok and checks.get("worker", "ok") == "ok"
    body = {"status": "ok" if ok else "unavailable", "checks": checks}
    return Response(json.dumps(body), status_code=200 if ok else 503, media_type="application/json")


def _disk_check(settings: Settings) -> dict[str, Any]:
    try:
        free = free_bytes(settings.data_dir)
    except OSError as e:
        return {"status": f"unreadable: {e}"}
    low = free < settings.min_free_bytes
    return {"status": "low: uploads are refused" if low else "ok", "free_bytes": free,
            "min_free_bytes": settings.min_free_bytes}  # fmt: skip


@router.get("/metrics", summary="Prometheus metrics", response_class=Response,
            responses={200: {"content": {CONTENT_TYPE: {}}}})  # fmt: skip
async def metrics(metrics: MetricsDep) -> Response:
    body = await run_in_threadpool(metrics.render)
    return Response(body, media_type=CONTENT_TYPE)

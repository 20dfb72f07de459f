"""What routes depend on, in one place (the FastAPI full-stack template's ``deps.py``).

``create_app`` builds one :class:`Services` and puts it on ``app.state``; routes never read ``app.state``
themselves, they declare what they need (``store: StoreDep``, ``settings: SettingsDep``, ...). A test can
mount a single router on a bare app and hand it real objects with ``app.dependency_overrides``.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi import Path as PathParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from api.batcher import PredictorCache
from api.errors import APIError
from api.metrics import Metrics
from deploy.registry import Registry
from deploy.runtime import Predictor
from worker.settings import Settings
from worker.store import Store


class Services:
    """What the routes share, one per app: settings, store, model registry, predictors, metrics."""

    def __init__(
        self, settings: Settings, store: Store, *, max_batch: int = 16, max_wait_s: float = 0.004, cache_size: int = 4
    ):
        self.settings, self.store = settings, store
        self.registry = Registry(settings.models_dir)
        self.metrics = Metrics(store.count_jobs_by_state)
        self.predictors = PredictorCache(
            self.load_predictor,
            capacity=cache_size,
            max_batch=max_batch,
            max_wait_s=max_wait_s,
            on_batch=self.metrics.batch_size.observe,
        )

    def load_predictor(self, model_id: str) -> Predictor:
        # Predictor checks model.onnx against the sha256 in model.json (a tampered model is refused).
        # No spinning: between requests ORT's idle threads would otherwise burn the cores that HTTP
        # handling and image decoding need (measured: about twice the /detect throughput without it).
        return Predictor(self.registry.path(model_id), max_pixels=self.settings.max_image_pixels,
                         session_config={"session.intra_op.allow_spinning": "0",
                                         "session.inter_op.allow_spinning": "0"})  # fmt: skip

    async def close(self) -> None:
        await self.predictors.close()


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_settings(request: Request) -> Settings:
    return get_services(request).settings


def get_store(request: Request) -> Store:
    return get_services(request).store


def get_registry(request: Request) -> Registry:
    return get_services(request).registry


def get_predictors(request: Request) -> PredictorCache:
    return get_services(request).predictors


def get_metrics(request: Request) -> Metrics:
    return get_services(request).metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
RegistryDep = Annotated[Registry, Depends(get_registry)]
PredictorsDep = Annotated[PredictorCache, Depends(get_predictors)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]

# An id in a path (``/v1/jobs/{job_id}``): bounded so that no lookup is made for a megabyte of text.
ResourceId = Annotated[str, PathParam(max_length=64)]

# Module level: FastAPI resolves the (postponed) annotations of dependencies in module globals.
BEARER = HTTPBearer(auto_error=False, description="an API key from LDD_API_KEYS")


def require_key(
    creds: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)], settings: SettingsDep
) -> None:
    """With ``LDD_API_KEYS`` set, the request must carry ``Authorization: Bearer <one of them>``."""
    keys = settings.api_keys
    if not keys:
        return
    token = (creds.credentials if creds else "").encode()
    # compare_digest: the time taken does not tell how much of a key was right.
    if not any(hmac.compare_digest(token, k.encode()) for k in keys):
        raise APIError(
            401,
            "unauthorized",
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


def get_or_404(get: Callable[[str], dict[str, Any] | None], kind: str, id: str) -> dict[str, Any]:
    """``get(id)`` (a ``Store.get_*``), or a 404 ``not_found`` naming the ``kind`` of thing missing."""
    row = get(id)
    if row is None:
        raise APIError(404, "not_found", f"no {kind} {id!r}")
    return row

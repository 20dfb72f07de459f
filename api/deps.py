"""What routes depend on, in one place (the FastAPI full-stack template's ``deps.py``).

``create_app`` builds one :class:`Services` and puts it on ``app.state``; routes never read ``app.state``
themselves, they declare what they need (``store: StoreDep``, ``settings: SettingsDep``, ...). A test can
mount a single router on a bare app and hand it real objects with ``app.dependency_overrides``.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Header, Request, Response
from fastapi import Path as PathParam
from fastapi.security import HTTPBearer
from PIL import Image

from api.batcher import PredictorCache
from api.errors import APIError, ErrorResponse
from api.metrics import Metrics
from api.uploads import free_bytes
from core.artifacts import Artifacts, artifacts_for, model_key
from core.deletion import Held
from core.settings import Settings
from core.store import Store
from core.tenants import OPEN, Caller, parse_keys, visible
from deploy.backends import select_providers
from deploy.precision import OPENVINO_PRECISION
from deploy.registry import read_model_json
from deploy.runtime import Predictor


class Services:
    """What the routes share, one per app: settings, store, stored files (and this machine's copies of the
    published models), predictors, metrics."""

    def __init__(
        self, settings: Settings, store: Store, *, max_batch: int = 16, max_wait_s: float = 0.004, cache_size: int = 4
    ):
        self.settings, self.store = settings, store
        self.artifacts = artifacts_for(settings)
        self.metrics = Metrics(
            store.count_jobs_by_state,
            lambda: free_bytes(settings.data_dir),
            settings.min_free_bytes,
            self.artifacts.usage,
        )
        self.predictors = PredictorCache(
            self.load_predictor,
            capacity=cache_size,
            max_batch=max_batch,
            max_wait_s=max_wait_s,
            on_batch=self.metrics.batch_size.observe,
            max_queue=settings.detect_queue,
        )
        # What serves each model this process has loaded: backend and providers (``serving``).
        self._serving: dict[str, dict[str, Any]] = {}

    def load_predictor(self, model_id: str) -> Predictor:
        # Predictor checks model.onnx against the sha256 in model.json (a tampered model is refused).
        # No spinning: between requests ORT's idle threads would otherwise burn the cores that HTTP
        # handling and image decoding need (measured: about twice the /detect throughput without it).
        predictor = Predictor(self.model_dir(model_id), backend=self.settings.backend,
                              providers=self.settings.providers or None, max_pixels=self.settings.max_image_pixels,
                              session_config={"session.intra_op.allow_spinning": "0",
                                              "session.inter_op.allow_spinning": "0"})  # fmt: skip
        self._serving[model_id] = {"backend": predictor.backend, "providers": predictor.providers, "loaded": True}
        return predictor

    def model_dir(self, model_id: str) -> Path:
        """The local folder of a published model, whole and verified (fetched from object storage if needed):
        the data folder's ``models/<id>``, or this machine's copy of the stored one. ``FileNotFoundError`` when
        it is not stored."""
        return self.artifacts.tree(model_key(model_id))

    async def warm(self, model_id: str) -> None:
        """Load ``model_id`` and run it once on a blank image, so that the first request a deployment switches
        to it pays neither the session's opening nor its first-call allocations."""
        predictor, _ = await self.predictors.get(model_id)
        width, height = predictor.input_size
        await asyncio.to_thread(predictor.predict_loaded, [Image.new("RGB", (int(width), int(height)))])

    def serving(self, model_id: str) -> dict[str, Any]:
        """The backend and providers that serve ``model_id`` here: those of its session once loaded, else
        those the settings would choose (``loaded`` False)."""
        if model_id in self._serving:
            return self._serving[model_id]
        backend = self.settings.backend
        try:  # a bf16 model is served by OpenVINO whatever the setting (deploy.precision)
            if read_model_json(self.model_dir(model_id)).get("precision") in OPENVINO_PRECISION:
                backend = "openvino"
        except (ValueError, OSError):  # not stored, or its model.json unreadable: the settings decide
            pass
        if backend == "onnxruntime":
            import onnxruntime as ort

            providers = select_providers(self.settings.providers, ort.get_available_providers())
        else:
            providers = [f"openvino-{next((p.upper() for p in self.settings.providers), 'CPU')}"]
        return {"backend": backend, "providers": providers, "loaded": False}

    async def close(self) -> None:
        await self.predictors.close()


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_settings(request: Request) -> Settings:
    return get_services(request).settings


def get_store(request: Request) -> Store:
    return get_services(request).store


def get_predictors(request: Request) -> PredictorCache:
    return get_services(request).predictors


def get_metrics(request: Request) -> Metrics:
    return get_services(request).metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
# The header that makes a POST of a job or a study safe to retry (same key and body: the same resource).
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255)]
PredictorsDep = Annotated[PredictorCache, Depends(get_predictors)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def get_artifacts(settings: SettingsDep) -> Artifacts:
    return artifacts_for(settings)  # the one per settings that Services holds too


ArtifactsDep = Annotated[Artifacts, Depends(get_artifacts)]
ServicesDep = Annotated[Services, Depends(get_services)]

# An id in a path (``/v1/jobs/{job_id}``): the shape of the ids the service makes (``distill.spec``'s, bounded
# by the store's column), so that no lookup is made for a megabyte of text and the OpenAPI document says so.
ID_PATTERN = r"^[a-z]+_[0-9a-z]{8,64}$"
ResourceId = Annotated[str, PathParam(max_length=64, pattern=ID_PATTERN)]

# Declares bearer auth in the OpenAPI document; ``create_app`` adds it only when keys are configured. The key
# itself is checked by :func:`get_caller`, which every resource route depends on.
BEARER = HTTPBearer(auto_error=False, description="an API key from LDD_API_KEYS or LDD_ADMIN_KEYS")


@lru_cache(maxsize=8)
def _callers(api_keys: tuple[str, ...], admin_keys: tuple[str, ...]) -> dict[str, Caller]:
    return parse_keys(list(api_keys), list(admin_keys))


def callers_of(settings: Settings) -> dict[str, Caller]:
    """The configured keys and who they are (``core.tenants``); empty: the service is open."""
    return _callers(tuple(settings.api_keys), tuple(settings.admin_keys))


def get_caller(request: Request, settings: SettingsDep) -> Caller:
    """Who sends this request. With keys configured it must carry ``Authorization: Bearer <key>`` (else 401);
    without, every caller is the one open tenant."""
    callers = callers_of(settings)
    if not callers:
        return OPEN
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    found = None
    if scheme.lower() == "bearer":
        # compare_digest with every key: the time taken tells neither which key nor how much of one was right.
        for key, caller in callers.items():
            if hmac.compare_digest(token.strip().encode(), key.encode()):
                found = caller
    if found is None:
        raise APIError(
            401,
            "unauthorized",
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return found


CallerDep = Annotated[Caller, Depends(get_caller)]


def get_or_404(
    get: Callable[[str], dict[str, Any] | None], kind: str, id: str, scope: str | None = None
) -> dict[str, Any]:
    """``get(id)`` (a ``Store.get_*``), or a 404 ``not_found`` naming the ``kind`` of thing missing. ``scope``:
    the caller's (``Caller.scope``); another tenant's row is missing, word for word."""
    row = get(id)
    if not visible(row, scope):
        raise APIError(404, "not_found", f"no {kind} {id!r}")
    assert row is not None
    return row


# DELETE's refusal (``core.deletion``): the resource is still used, ``details.holders`` says by what.
IN_USE: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorResponse, "description": "still used: details.holders names what uses it"}
}


def delete_or_409(delete: Callable[..., None], *args: Any) -> Response:
    """Run a ``core.deletion`` function: 204, or 409 ``in_use`` with the holders' ids."""
    try:
        delete(*args)
    except Held as e:
        raise APIError(409, "in_use", str(e), {"holders": e.holders}) from e
    return Response(status_code=204)

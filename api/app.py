"""The REST API (DESIGN section 4). Run it with ``uvicorn --factory api.app:create_app`` or ``ldd api``.

:func:`create_app` only assembles: the settings and the store, the services the routes share
(``api.deps``), the middleware, the error handlers and one router per resource (``api.routes``).

This process never imports torch (the serving image has none): jobs are checked with the pydantic
``distill.spec`` and ``core.checks``, datasets with the torch-free ``distill.data`` readers, checkpoints
with ``distill.ckpt_reader``, and detections come from ``deploy.runtime`` (ONNX Runtime). The job store
(``core.store``) is the source of truth; the broker only carries wake-ups (``core.queue``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from api.deps import BEARER, Services, callers_of, get_caller
from api.errors import error_docs, install_error_handlers
from api.middleware import BodyLimitMiddleware, LatencyMiddleware
from api.routes import checkpoints, datasets, deployments, detect, figures, health, jobs, models, studies, ui
from api.uploads import remove_stale_uploads
from core.settings import Settings
from core.store import Store

DESCRIPTION = (
    "Upload a dataset, submit `train` or `distill` jobs, follow them (poll or server-sent events), "
    "and call `/detect` on the published ONNX students. Errors are "
    '`{"error": {"code", "message", "details"}}`. With API keys configured every endpoint but '
    "`/healthz`, `/readyz` and `/metrics` needs `Authorization: Bearer <key>`; each key belongs to a tenant, "
    "which sees only its own datasets, checkpoints, jobs and models (another tenant's are 404)."
)


def _log_to_stderr() -> None:
    """The service's own records (deletions and deployment switches with their tenant, model loading errors) go
    to stderr beside uvicorn's, at INFO, unless the process configured logging itself."""
    logger = logging.getLogger("ldd")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def create_app(
    settings: Settings | None = None,
    *,
    store: Store | None = None,
    max_batch: int = 16,
    max_wait_ms: float = 4.0,
    cache_size: int = 4,
) -> FastAPI:
    """Build the API. Without arguments everything comes from ``LDD_*`` environment variables.

    ``max_batch`` and ``max_wait_ms`` shape the /detect micro-batches; ``cache_size`` is how many models
    stay loaded.
    """
    settings = settings or Settings.from_env()
    settings.make_dirs()
    _log_to_stderr()
    store = store or Store(settings.store_url)
    services = Services(settings, store, max_batch=max_batch, max_wait_s=max_wait_ms / 1000, cache_size=cache_size)
    remove_stale_uploads(settings.data_dir)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await services.close()

    app = FastAPI(
        title="LD service",
        version="0.1.0",
        summary="Localization Distillation (LD + VLR) for dense object detectors: train, distil, export, serve.",
        description=DESCRIPTION,
        lifespan=lifespan,
        responses=error_docs(422),
    )
    app.state.services = services  # read by api.deps only
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(LatencyMiddleware, metrics=services.metrics)

    app.include_router(health.router)  # no key: probes and scrapers have none
    app.include_router(ui.router)  # no key: the page holds no data; its calls to /v1 send the user's key
    ui.mount_static(app)
    # Every resource route checks the key (get_caller; a route that names no caller still gets the check). The
    # document declares bearer auth and its 401 only when keys are configured: an open service says it is open.
    dependencies = [Depends(get_caller)]
    responses: dict[int | str, dict[str, Any]] = {}
    if callers_of(settings):
        dependencies.append(Depends(BEARER))
        responses = error_docs(401)
    for module in (datasets, checkpoints, jobs, figures, studies, models, deployments, detect):
        app.include_router(module.router, dependencies=dependencies, responses=responses)
    return app

"""``/v1/jobs``: submit (checked, then queued), list, describe, cancel, and follow by server-sent events.

A job is checked by ``core.checks.check_job``, the same function the worker calls before running it; the
store then holds the job (the source of truth) and the broker only carries a wake-up for the workers.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from api import schemas
from api.deps import IN_USE, CallerDep, IdempotencyKey, ResourceId, SettingsDep, StoreDep, delete_or_409, get_or_404
from api.errors import APIError, ErrorResponse, error_docs
from api.presenters import public_job
from core import deletion, history
from core.checks import JobRefused, check_job
from core.queue import enqueue
from core.store import JOB_STATES, TERMINAL_STATES, IdempotencyConflict, Store, TooManyActiveJobs
from distill.spec import JobSpec

assert set(schemas.JobState.__args__) == set(JOB_STATES)  # type: ignore[attr-defined]

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# OpenAPI examples: requests that pass the spec (tests/test_api_routes.py validates them). The ids are
# of the shapes the service makes: <prefix>_<16 hex> (core.store.new_id), a job's model mdl_<its hex>.
JOB_EXAMPLES = {
    "distill": {
        "summary": "distil a ResNet-18 student from a published teacher",
        "value": {
            "kind": "distill",
            "name": "r18-from-r101",
            "dataset": "ds_3f2a9c1b0d4e5f67",
            "student": {"arch": "gfl_r18", "init": "imagenet"},
            "teacher": {"model": "mdl_5e6f7a8b9c0d1e2f"},
            "distill": {
                "method": "ld",
                "tau": 10,
                "gamma": 0.25,
                "kd_tau": 2,
                "weights": {"main_ld": 0.25, "vlr_ld": 0.25, "main_kd": 1.0, "vlr_kd": 0.0},
            },
            "schedule": {"epochs": 12, "batch_size": 16, "image_size": [1333, 800]},
            "seed": 0,
        },  # fmt: skip
    },
    "train": {
        "summary": "train a detector alone (e.g. the teacher), its backbone from ImageNet",
        "value": {
            "kind": "train",
            "dataset": "ds_3f2a9c1b0d4e5f67",
            "student": {"arch": "gfl_r50", "init": "imagenet"},
            "loss": {"cls": 1.0, "giou": 2.0, "dfl": 0.25},
            "schedule": {"epochs": 12, "batch_size": 8},
        },  # fmt: skip
    },
    "finetune": {
        "summary": "fine-tune an uploaded detector (POST /v1/checkpoints) on this dataset",
        "value": {
            "kind": "train",
            "dataset": "ds_3f2a9c1b0d4e5f67",
            "student": {"arch": "gfl_r101", "init": {"checkpoint": "ckpt_0a1b2c3d4e5f6789"}},
            "schedule": {"epochs": 6, "batch_size": 8, "lr": 0.005},
        },  # fmt: skip
    },
}

# What a client following a job cares about; heartbeats also touch updated_at every few seconds.
_EVENT_FIELDS = ("state", "progress", "metrics", "error", "model_id", "attempts", "cancel_requested")


@router.post(
    "",
    status_code=202,
    response_model=schemas.Job,
    summary="Submit a train or distill job",
    description=(
        "Validated against the job spec (unknown fields are refused; files are named by id, never by a path). "
        "The dataset, the teacher and an initial checkpoint must exist, the teacher must match the student "
        "(reg_max, strides; classes are matched by name for KD) and initial weights must fit it. Returns 202 "
        "with the queued job. With `Idempotency-Key`, the same key and body return the same job (header "
        "`Idempotent-Replayed: true`); the same key with another body is refused (422). Keys are per tenant. "
        "The dataset, teacher and checkpoints must be the caller's tenant's (another tenant's id is refused as "
        "one that names nothing). With `LDD_MAX_ACTIVE_JOBS`, a tenant with that many queued or running jobs "
        "gets 429."
    ),
    responses=error_docs(400, 404, 422, 429),
)
def submit_job(
    spec: Annotated[JobSpec, Body(openapi_examples=JOB_EXAMPLES)],
    response: Response,
    store: StoreDep,
    settings: SettingsDep,
    caller: CallerDep,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    try:
        check_job(spec, store, settings, caller.scope)
    except JobRefused as e:
        raise APIError(e.status, e.code, e.message, e.details) from e
    try:
        job, created = store.create_job(spec.model_dump(mode="json"), idempotency_key=idempotency_key,
                                        tenant=caller.tenant, max_active=settings.max_active_jobs)  # fmt: skip
    except IdempotencyConflict as e:
        raise APIError(422, "idempotency_conflict", str(e), {"job_id": e.job_id}) from e
    except TooManyActiveJobs as e:
        raise APIError(429, "too_many_active_jobs", str(e), {"active": e.active, "limit": e.limit}) from e
    if created:
        # Best effort: if the broker is down, the worker's recovery loop re-sends queued jobs from the store.
        enqueue(job["id"], settings, spec=job["spec"])
    else:
        response.headers["Idempotent-Replayed"] = "true"
    return public_job(job)


@router.get("", response_model=schemas.JobList, summary="List jobs (the caller's tenant's), newest first")
def list_jobs(
    store: StoreDep,
    caller: CallerDep,
    state: Annotated[schemas.JobState | None, Query(description="only jobs in this state")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    return {"jobs": [public_job(j) for j in store.list_jobs(state=state, limit=limit, tenant=caller.scope)]}


@router.get("/{job_id}", response_model=schemas.Job, summary="A job: state, progress, metrics, model_id, error",
            responses=error_docs(404))  # fmt: skip
def get_job(job_id: ResourceId, store: StoreDep, caller: CallerDep) -> dict[str, Any]:
    return public_job(get_or_404(store.get_job, "job", job_id, caller.scope))


@router.post(
    "/{job_id}/cancel",
    response_model=schemas.Job,
    summary="Cancel a queued or running job",
    description="A queued job is cancelled at once; a running one is stopped by its worker within seconds.",
    responses={**error_docs(404), 409: {"model": ErrorResponse, "description": "the job already ended"}},
)
def cancel_job(job_id: ResourceId, store: StoreDep, caller: CallerDep) -> dict[str, Any]:
    job = get_or_404(store.get_job, "job", job_id, caller.scope)
    if job["state"] in TERMINAL_STATES:
        raise APIError(409, "job_finished", f"job {job_id} already ended ({job['state']})")
    return public_job(store.request_cancel(job_id))


@router.get(
    "/{job_id}/events",
    summary="Server-sent events with the job's progress until it ends",
    description=(
        "`event: job` with the job JSON whenever it changes, then `event: end` with the final job. "
        "Comment lines keep the connection alive."
    ),
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **error_docs(404)},
)
async def job_events(
    job_id: ResourceId,
    request: Request,
    store: StoreDep,
    caller: CallerDep,
    interval: Annotated[float, Query(ge=0.1, le=10, description="polling period in seconds")] = 0.5,
) -> StreamingResponse:
    await run_in_threadpool(get_or_404, store.get_job, "job", job_id, caller.scope)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_job_stream(job_id, request, store, interval), media_type="text/event-stream",
                             headers=headers)  # fmt: skip


async def _job_stream(job_id: str, request: Request, store: Store, interval: float) -> AsyncIterator[str]:
    """Polls the store (the source of truth; no broker involved) and sends what changed."""
    last, n, quiet_since = None, 0, time.monotonic()
    while True:
        job = await run_in_threadpool(store.get_job, job_id)
        if job is None:
            return
        pub = public_job(job)
        key = json.dumps([pub.get(k) for k in _EVENT_FIELDS], sort_keys=True)
        if key != last:
            last, n, quiet_since = key, n + 1, time.monotonic()
            yield f"id: {n}\nevent: job\ndata: {json.dumps(pub)}\n\n"
        if pub["state"] in TERMINAL_STATES:
            yield f"id: {n + 1}\nevent: end\ndata: {json.dumps(pub)}\n\n"
            return
        if time.monotonic() - quiet_since > 15:  # proxies close connections that stay silent for long
            quiet_since = time.monotonic()
            yield ": keep-alive\n\n"
        if await request.is_disconnected():
            return
        await asyncio.sleep(interval)


@router.get(
    "/{job_id}/history",
    response_model=schemas.JobHistory,
    summary="The run over time: losses, learning rate and evaluation results, for curves",
    description=(
        "Each progress record the worker relayed while the job ran (about every `LDD_PROGRESS_SECONDS`), in run "
        "order, with the attempt that relayed it; a resumed attempt continues from its checkpoint's iteration "
        "(what an earlier attempt recorded past it is gone). `evaluations` are the records of COCO evaluations "
        "(AP, AP50, AP75, ...). With `after`, only the records past that iteration (to poll for new points)."
    ),
    responses=error_docs(404),
)
def job_history(
    job_id: ResourceId,
    store: StoreDep,
    caller: CallerDep,
    after: Annotated[int, Query(ge=-1, le=2**31, description="only records past this iteration")] = -1,
) -> dict[str, Any]:
    get_or_404(store.get_job, "job", job_id, caller.scope)
    records = history.read(store, job_id, after)
    # distill.train reports its final evaluation as the "done" record, the COCO metrics in place of losses.
    evaluations = [{"iter": r.get("iter"), "attempt": r["attempt"], "bbox": r.get("losses") or {}}
                   for r in records if r.get("phase") == "done" and "AP" in (r.get("losses") or {})]  # fmt: skip
    return {"job_id": job_id, "records": records, "evaluations": evaluations}


@router.delete("/{job_id}", status_code=204, response_class=Response, responses={**error_docs(404), **IN_USE},
               summary="Delete an ended job, its history and run files (its models stay; 409 if queued, running "
                       "or part of a study)")  # fmt: skip
def delete_job(job_id: ResourceId, store: StoreDep, settings: SettingsDep, caller: CallerDep) -> Response:
    job = get_or_404(store.get_job, "job", job_id, caller.scope)
    return delete_or_409(deletion.delete_job, store, settings, job, caller.tenant)

"""``/v1/studies``: which method pays off on this data? The plain student and each method row over N seeds, run
as ordinary jobs (``core.studies``), then a report: a table of AP mean ± std, gains paired by seed and their
significance, the paper's figure 4 per row, a chart, and the recommended model.

A study is checked whole before anything is stored: each of its jobs passes the one job check
(``core.checks.check_job``). Its jobs are queued and woken exactly as ``POST /v1/jobs`` does
(``core.queue.enqueue``; the recovery loop re-sends a lost message).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Query, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field

from api.deps import IN_USE, CallerDep, IdempotencyKey, ResourceId, SettingsDep, StoreDep, delete_or_409, get_or_404
from api.errors import APIError, ErrorResponse, error_docs
from api.schemas import JobState
from core import deletion, studies
from core.checks import JobRefused
from core.queue import enqueue
from core.settings import Settings
from core.store import Store

router = APIRouter(prefix="/v1/studies", tags=["studies"])

STUDY_EXAMPLES = {
    "methods": {
        "summary": "the student alone, LD, CrossKD, BCKD and one combination, 3 seeds each",
        "value": {
            "name": "which method on bccd",
            "dataset": "ds_3f2a9c1b0d4e5f67",
            "teacher": {"job": "job_5e6f7a8b9c0d1e2f"},
            "student": {"arch": "gfl_tiny"},
            "schedule": {"epochs": 4, "batch_size": 8, "image_size": [256, 192]},
            "methods": [
                "ld",
                "crosskd",
                "bckd",
                {"name": "crosskd+vlr", "distill": {"method": "crosskd", "weights": {"vlr_ld": 0.25}}},
            ],
            "seeds": 3,
        },  # fmt: skip
    },
}


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StudyJob(_Open):
    row: str = Field(..., examples=["student alone"])
    method: str | None = Field(None, description="the row's distill.method; null for the plain student",
                               examples=["ld"])  # fmt: skip
    seed: int = Field(..., examples=[0])
    job_id: str = Field(..., examples=["job_5e6f7a8b9c0d1e2f"])
    state: JobState = Field(..., examples=["queued"])
    AP: float | None = Field(None, description="the job's COCO AP (0-1) once it succeeded")
    model_id: str | None = None
    progress: float | None = Field(None, description="how far its training got, 0-1")


class StudyProgress(BaseModel):
    jobs: int = Field(..., examples=[9])
    ended: int = Field(..., examples=[3])


class Study(_Open):
    id: str = Field(..., examples=["st_3f2a9c1b0d4e5f67"])
    name: str | None = None
    state: studies.StudyState
    spec: dict[str, Any] = Field(..., description="the validated study spec, defaults filled in")
    created_at: str | None = None
    finished_at: str | None = None
    cancel_requested: bool = False
    jobs: list[StudyJob]
    progress: StudyProgress
    report: dict[str, Any] | None = Field(
        None,
        description="null until every job ended; then rows (AP, AP50, AP75 as mean/std/n/values, gain paired by "
        "seed vs the student alone with its 95% Student-t interval: mean/std/n/half_width/low/high/pairs, "
        "significant = the interval excludes 0, diagnostics, best, failed), recommended, failures, report_md and "
        "report_png (links)",
    )


class StudyList(BaseModel):
    studies: list[Study]


def _view(store: Store, settings: Settings, study: dict[str, Any]) -> dict[str, Any]:
    """The study as clients see it, finished first if its jobs all ended without a worker to say so (queued jobs
    cancelled, jobs failed by the recovery loop): the report is computed at most once whoever asks first."""
    if study["finished_at"] is None:
        try:
            study = studies.refresh(store, settings, study["id"]) or study
        except OSError as e:  # e.g. no room for the report files: answer with what is known, retry next time
            raise APIError(507, "no_room", f"could not write the study's report: {e}") from e
    return studies.public_study(study, studies.members(store, study["id"]))


@router.post(
    "",
    status_code=202,
    response_model=Study,
    summary="Start a study: the plain student and each method, each over N seeds, as ordinary jobs",
    description=(
        "Every job of the study passes the job check first (all or nothing; the error names the row and seed). "
        "Returns 202 with the running study and its queued jobs. With `Idempotency-Key`, the same key and body "
        "return the same study (header `Idempotent-Replayed: true`); the same key with another body is refused "
        "(422). Keys are per tenant. With `LDD_MAX_ACTIVE_JOBS`, a study whose jobs would take its tenant past "
        "the limit gets 429."
    ),
    responses=error_docs(400, 404, 422, 429, 507),
)
def submit_study(
    spec: Annotated[studies.StudySpec, Body(openapi_examples=STUDY_EXAMPLES)],
    response: Response,
    store: StoreDep,
    settings: SettingsDep,
    caller: CallerDep,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    try:
        study, created, job_ids = studies.submit(store, settings, spec, tenant=caller.tenant, scope=caller.scope,
                                                 idempotency_key=idempotency_key)  # fmt: skip
    except JobRefused as e:
        raise APIError(e.status, e.code, e.message, e.details) from e
    except studies.StudyConflict as e:
        raise APIError(422, "idempotency_conflict", str(e), {"study_id": e.study_id}) from e
    except studies.StudyTooBig as e:
        raise APIError(429, "too_many_active_jobs", str(e),
                       {"active": e.active, "limit": e.limit, "needed": e.needed}) from e  # fmt: skip
    for job_id in job_ids:
        job = store.get_job(job_id)  # its spec picks its queue (core.routing)
        # Best effort, as POST /v1/jobs: the recovery loop re-sends lost messages.
        enqueue(job_id, settings, spec=job and job["spec"])
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return _view(store, settings, study)


@router.get(
    "",
    response_model=StudyList,
    summary="List studies (the caller's tenant's), newest first",
    responses=error_docs(507),
)
def list_studies(
    store: StoreDep, settings: SettingsDep, caller: CallerDep, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> dict[str, Any]:
    return {"studies": [_view(store, settings, s) for s in studies.list_studies(store, caller.scope, limit)]}


@router.get("/{study_id}", response_model=Study, summary="A study: its jobs, progress and, once all ended, its report",
            responses=error_docs(404, 507))  # fmt: skip
def get_study(study_id: ResourceId, store: StoreDep, settings: SettingsDep, caller: CallerDep) -> dict[str, Any]:
    return _view(store, settings, get_or_404(lambda i: studies.get_study(store, i), "study", study_id, caller.scope))


@router.post(
    "/{study_id}/cancel",
    response_model=Study,
    summary="Cancel a study: every one of its jobs still queued or running",
    description="Queued jobs are cancelled at once, running ones stopped by their workers within seconds; the "
    "report (with the rows that finished) follows when all ended.",
    responses={**error_docs(404, 507), 409: {"model": ErrorResponse, "description": "the study already ended"}},
)
def cancel_study(study_id: ResourceId, store: StoreDep, settings: SettingsDep, caller: CallerDep) -> dict[str, Any]:
    study = _view(store, settings, get_or_404(lambda i: studies.get_study(store, i), "study", study_id, caller.scope))
    if study["finished_at"] is not None:
        raise APIError(409, "study_finished", f"study {study_id} already ended ({study['state']})")
    return _view(store, settings, studies.cancel(store, settings, study_id))


def _report_file(store: Store, settings: Settings, study_id: str, scope: str | None, name: str) -> FileResponse:
    study = get_or_404(lambda i: studies.get_study(store, i), "study", study_id, scope)
    if study["finished_at"] is None:
        study = _view(store, settings, study)
    path = studies.study_dir(settings, study_id) / name
    if study["finished_at"] is None or not path.is_file():
        raise APIError(404, "not_found", f"study {study_id} has no {name} yet: it is written when all its jobs end")
    media = "text/markdown; charset=utf-8" if name.endswith(".md") else "image/png"
    return FileResponse(path, media_type=media)


@router.get(
    "/{study_id}/report.md",
    summary="The study's report as a Markdown table (404 until written)",
    response_class=FileResponse,
    responses={200: {"content": {"text/markdown": {"schema": {"type": "string"}}}}, **error_docs(404, 507)},
)
def study_report_md(study_id: ResourceId, store: StoreDep, settings: SettingsDep, caller: CallerDep) -> FileResponse:
    return _report_file(store, settings, study_id, caller.scope, "report.md")


@router.get("/{study_id}/report.png", summary="The study's chart (404 until written)", response_class=FileResponse,
            responses={200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}},
                       **error_docs(404, 507)})  # fmt: skip
def study_report_png(study_id: ResourceId, store: StoreDep, settings: SettingsDep, caller: CallerDep) -> FileResponse:
    return _report_file(store, settings, study_id, caller.scope, "report.png")


@router.delete("/{study_id}", status_code=204, response_class=Response, responses={**error_docs(404), **IN_USE},
               summary="Delete an ended study, its jobs and report (409 while a job of it runs)")  # fmt: skip
def delete_study(study_id: ResourceId, store: StoreDep, settings: SettingsDep, caller: CallerDep) -> Response:
    study = get_or_404(lambda i: studies.get_study(store, i), "study", study_id, caller.scope)
    return delete_or_409(deletion.delete_study, store, settings, study, caller.tenant)

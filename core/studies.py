"""Studies: "does distillation help on my data, and which method?" answered by ordinary jobs. Torch-free.

A :class:`StudySpec` names one dataset, teacher, student and schedule, the method rows to compare and a number
of seeds. :func:`plan` turns it into job specs: for each seed, the plain student (kind ``train``, row
``"student alone"``) and one ``distill`` job per method row, all with that seed. :func:`submit` checks every one
of them with ``core.checks.check_job`` (the one job check) before anything is stored, then inserts the study
and its jobs in one transaction: all or nothing, the tenant's active-job limit counted for the whole study. The
jobs are ordinary queued jobs of the same table, queue, leases and resume; the caller sends their wake-ups
(``core.queue.enqueue``), as ``POST /v1/jobs`` does.

When the last job of a study ends, :func:`refresh` writes the report (``core.study_report``) and sets the
study's final state in one conditional UPDATE. It is idempotent and safe to race: the worker calls it when a job
of a study ends, the API when it reads a study whose jobs ended without a worker (queued jobs cancelled, jobs
failed by the recovery loop); both compute the same report from the same ended jobs, files are replaced
atomically, and only the first UPDATE sets the state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from core import study_report
from core.checks import JobRefused, check_job
from core.db import plain, utcnow
from core.schema import jobs, studies, study_jobs
from core.settings import Settings
from core.store import (
    ACTIVE_STATES,
    TERMINAL_STATES,
    Store,
    job_row,
    new_id,
    spec_digest,
)
from core.study_report import PLAIN_ROW
from core.tenants import DEFAULT_TENANT
from distill.spec import (
    DistillSpec,
    ExportSpec,
    GFLWeights,
    JobSpec,
    Method,
    ScheduleSpec,
    StudentSpec,
    TeacherSpec,
)

log = logging.getLogger("ldd.studies")

StudyState = Literal["running", "succeeded", "failed", "cancelled"]


class MethodRow(BaseModel):
    """A named row: any distillation spec (a method's preset weights, or a combination of terms)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(..., min_length=1, max_length=60, pattern=r"^[^|\r\n\t]+$", examples=["crosskd+vlr"])
    distill: DistillSpec = Field(default_factory=DistillSpec)


class StudySpec(BaseModel):
    """The body of ``POST /v1/studies``. Every field but ``dataset``, ``teacher`` and ``methods`` has a default;
    ``student``, ``loss``, ``schedule`` and ``export`` are shared by every job of the study."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, max_length=200, examples=["which method on bccd"])
    dataset: str = JobSpec.model_fields["dataset"]
    val_split: float | None = JobSpec.model_fields["val_split"]
    teacher: TeacherSpec
    student: StudentSpec = Field(default_factory=StudentSpec)
    loss: GFLWeights = Field(default_factory=GFLWeights)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)
    methods: list[Method | MethodRow] = Field(
        ...,
        min_length=1,
        max_length=8,
        description="the rows beside the plain student: a method name "
        "(distill.method with its preset weights) or {name, distill}",
        examples=[["ld", "crosskd", "bckd"]],
    )
    seeds: int = Field(3, ge=1, le=10, description="every row runs with seeds 0..seeds-1 (paired by seed)")

    @field_validator("methods")
    @classmethod
    def _unique_rows(cls, v: list[str | MethodRow]) -> list[str | MethodRow]:
        names = [row_name(r) for r in v]
        if PLAIN_ROW in names:
            raise ValueError(f"{PLAIN_ROW!r} is the plain student's row; name the method row otherwise")
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"method rows need distinct names; repeated: {', '.join(dupes)}")
        return v


def row_name(row: str | MethodRow) -> str:
    return row if isinstance(row, str) else row.name


@dataclass(frozen=True)
class PlannedJob:
    row: str
    method: str | None  # distill.method of the row; None for the plain student
    seed: int
    spec: JobSpec


def plan(spec: StudySpec) -> list[PlannedJob]:
    """The study's jobs, seed by seed (so the first paired results come early): the plain student, then each
    method row in the order given."""
    out = []
    shared = dict(dataset=spec.dataset, val_split=spec.val_split, student=spec.student, loss=spec.loss,
                  schedule=spec.schedule, export=spec.export)  # fmt: skip
    label = spec.name or "study"
    for seed in range(spec.seeds):
        out.append(
            PlannedJob(
                PLAIN_ROW,
                None,
                seed,
                JobSpec(kind="train", name=f"{label}: {PLAIN_ROW}, seed {seed}"[:200], seed=seed, **shared),
            )
        )
        for row in spec.methods:
            distill = DistillSpec(method=row) if isinstance(row, str) else row.distill
            name = row_name(row)
            out.append(PlannedJob(name, distill.method, seed, JobSpec(
                kind="distill", name=f"{label}: {name}, seed {seed}"[:200], seed=seed, teacher=spec.teacher,
                distill=distill, **shared)))  # fmt: skip
    return out


class StudyConflict(Exception):
    """The idempotency key was already used for a study with a different body."""

    def __init__(self, key: str, study_id: str):
        super().__init__(f"Idempotency-Key {key!r} was already used by study {study_id} with a different body")
        self.key, self.study_id = key, study_id


class StudyTooBig(Exception):
    """The study's jobs would take the tenant past its limit of queued or running jobs."""

    def __init__(self, tenant: str, active: int, limit: int, needed: int):
        super().__init__(
            f"this study needs {needed} jobs; tenant {tenant!r} has {active} queued or running and the "
            f"limit is {limit} (LDD_MAX_ACTIVE_JOBS): wait for some to end, or run fewer methods or seeds"
        )
        self.tenant, self.active, self.limit, self.needed = tenant, active, limit, needed


def submit(
    store: Store,
    settings: Settings,
    spec: StudySpec,
    *,
    tenant: str = DEFAULT_TENANT,
    scope: str | None = None,
    idempotency_key: str | None = None,
) -> tuple[dict[str, Any], bool, list[str]]:
    """Check and store a study: (its row, created, the ids of the jobs to enqueue).

    Raises :class:`JobRefused` naming the row and seed of the first job that fails the job check (nothing is
    stored), :class:`StudyConflict` for a key used with another body, :class:`StudyTooBig` when the tenant's
    active jobs plus this study's would pass ``settings.max_active_jobs``. The same key and body return the
    study made before (created False, no jobs to enqueue), even at the limit.
    """
    body = spec.model_dump(mode="json")
    digest = spec_digest(body)
    if idempotency_key is not None and (old := _by_key(store, tenant, idempotency_key)) is not None:
        return _same_or_conflict(old, digest, idempotency_key), False, []
    planned = plan(spec)
    checked: set[str] = set()
    for p in planned:
        # A job's seed and name play no part in the check (its files, architectures, class map): the jobs of the
        # other seeds pass or fail with this one, and a teacher checkpoint is read once per row, not per seed.
        same = spec_digest(p.spec.model_dump(mode="json", exclude={"seed", "name"}))
        if same in checked:
            continue
        checked.add(same)
        try:
            check_job(p.spec, store, settings, scope)
        except JobRefused as e:
            raise JobRefused(
                f"row {p.row!r}, seed {p.seed}: {e.message}",
                e.code,
                e.status,
                {**(e.details or {}), "row": p.row, "seed": p.seed},
            ) from e
    now = utcnow()
    study = dict(
        id=new_id("st"),
        name=spec.name,
        state="running",
        spec=body,
        spec_sha256=digest,
        idempotency_key=idempotency_key,
        cancel_requested=False,
        report=None,
        created_at=now,
        tenant=tenant,
    )
    rows = [job_row(p.spec.model_dump(mode="json"), None, tenant) for p in planned]
    limit = settings.max_active_jobs
    try:
        with store.tenant_tx(tenant if limit > 0 else None) as conn:
            if limit > 0 and (active := store.count_active(conn, tenant)) + len(rows) > limit:
                raise StudyTooBig(tenant, active, limit, len(rows))
            conn.execute(insert(studies).values(**study))
            conn.execute(insert(jobs), rows)
            conn.execute(insert(study_jobs), [
                dict(job_id=r["id"], study_id=study["id"], position=i, row_name=p.row, method=p.method, seed=p.seed)
                for i, (r, p) in enumerate(zip(rows, planned, strict=True))])  # fmt: skip
    except IntegrityError:
        if idempotency_key is None or (old := _by_key(store, tenant, idempotency_key)) is None:
            raise
        return _same_or_conflict(old, digest, idempotency_key), False, []  # a racing twin inserted first
    made = get_study(store, study["id"])
    assert made is not None
    return made, True, [r["id"] for r in rows]


def _by_key(store: Store, tenant: str, key: str) -> Any:
    with store.engine.connect() as conn:
        return conn.execute(select(studies).where(studies.c.tenant == tenant, studies.c.idempotency_key == key)).first()


def _same_or_conflict(row: Any, digest: str, key: str) -> dict[str, Any]:
    if row.spec_sha256 != digest:
        raise StudyConflict(key, row.id)
    return _study(row)


def _study(row: Any) -> dict[str, Any]:
    d = plain(row._mapping)
    d.pop("spec_sha256")
    d["cancel_requested"] = bool(d["cancel_requested"])
    return d


def get_study(store: Store, study_id: str) -> dict[str, Any] | None:
    with store.engine.connect() as conn:
        row = conn.execute(select(studies).where(studies.c.id == study_id)).first()
    return None if row is None else _study(row)


def list_studies(store: Store, tenant: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """Newest first; only ``tenant``'s unless None."""
    q = select(studies).order_by(studies.c.created_at.desc(), studies.c.id.desc()).limit(limit)
    if tenant is not None:
        q = q.where(studies.c.tenant == tenant)
    with store.engine.connect() as conn:
        return [_study(r) for r in conn.execute(q).all()]


def members(store: Store, study_id: str) -> list[dict[str, Any]]:
    """The study's jobs in plan order: row, method, seed and the job's own fields (state, metrics, model_id,
    error, progress)."""
    q = (select(study_jobs.c.row_name, study_jobs.c.method, study_jobs.c.seed, jobs.c.id, jobs.c.state,
                jobs.c.metrics, jobs.c.model_id, jobs.c.error, jobs.c.progress)
         .join(jobs, jobs.c.id == study_jobs.c.job_id)
         .where(study_jobs.c.study_id == study_id).order_by(study_jobs.c.position))  # fmt: skip
    with store.engine.connect() as conn:
        return [{"row": r.row_name, "method": r.method, "seed": r.seed, "job_id": r.id, "state": r.state,
                 "metrics": r.metrics, "model_id": r.model_id, "error": r.error, "progress": r.progress}
                for r in conn.execute(q).all()]  # fmt: skip


def study_of_job(store: Store, job_id: str) -> str | None:
    with store.engine.connect() as conn:
        return conn.execute(select(study_jobs.c.study_id).where(study_jobs.c.job_id == job_id)).scalar()


def cancel(store: Store, settings: Settings, study_id: str) -> dict[str, Any]:
    """Mark the study cancelled and cancel each of its jobs still queued or running (``Store.request_cancel``:
    queued ones at once, running ones by their worker within seconds); the report follows when all ended. A study
    whose jobs have all ended already is only finished, as it stands."""
    if not any(m["state"] in ACTIVE_STATES for m in members(store, study_id)):
        return refresh(store, settings, study_id) or {}
    with store.engine.begin() as conn:
        conn.execute(update(studies).where(studies.c.id == study_id, studies.c.finished_at.is_(None))
                     .values(cancel_requested=True))  # fmt: skip
    for m in members(store, study_id):
        if m["state"] in ACTIVE_STATES:
            store.request_cancel(m["job_id"])
    return refresh(store, settings, study_id) or {}


def final_state(study: dict[str, Any], states: list[str]) -> str:
    """``running`` while a job is queued or running; then ``cancelled`` (the study, or one of its jobs, was
    cancelled), ``failed`` (a job failed: the report still holds every row it could compute), or ``succeeded``."""
    if any(s not in TERMINAL_STATES for s in states):
        return "running"
    if study["cancel_requested"]:
        return "cancelled"
    if "failed" in states:
        return "failed"
    return "cancelled" if "cancelled" in states else "succeeded"


def study_dir(settings: Settings, study_id: str) -> Path:
    """Where a study's report.md and report.png are written."""
    return settings.data_dir / "studies" / study_id


def refresh(store: Store, settings: Settings, study_id: str) -> dict[str, Any] | None:
    """The study, finished first if every one of its jobs has ended: its report computed and written (report.md
    and report.png, each replaced atomically), then state, report and ``finished_at`` set by one UPDATE that
    only an unfinished study matches. Idempotent; None for an unknown study."""
    study = get_study(store, study_id)
    if study is None or study["finished_at"] is not None:
        return study
    ms = members(store, study_id)
    state = final_state(study, [m["state"] for m in ms])
    if state == "running":
        return study
    report = study_report.build(study_id, ms)
    study_report.write(study_dir(settings, study_id), study, report, settings.min_free_bytes)
    with store.engine.begin() as conn:
        conn.execute(update(studies).where(studies.c.id == study_id, studies.c.finished_at.is_(None))
                     .values(state=state, report=report, finished_at=utcnow()))  # fmt: skip
    log.info("study %s: %s; report written", study_id, state)
    return get_study(store, study_id)


def finish_ended(store: Store, settings: Settings) -> list[str]:
    """Finish every unfinished study none of whose jobs is still queued or running: the recovery loop's sweep
    for jobs that ended without a worker's hook (failed by an expired lease, cancelled while queued)."""
    active = (
        select(study_jobs.c.study_id)
        .join(jobs, jobs.c.id == study_jobs.c.job_id)
        .where(jobs.c.state.in_(("queued", "running")))
    )
    q = select(studies.c.id).where(studies.c.finished_at.is_(None), studies.c.id.not_in(active))
    with store.engine.connect() as conn:
        ids = list(conn.execute(q).scalars())
    return [i for i in ids if (s := refresh(store, settings, i)) is not None and s["finished_at"] is not None]


def job_ended(store: Store, settings: Settings, job_id: str) -> None:
    """The worker's hook when a job ends: finish its study if that was the study's last job. Never raises (the
    job's own end is recorded already; a failure here is retried by the next reader of the study)."""
    try:
        if (study_id := study_of_job(store, job_id)) is not None:
            refresh(store, settings, study_id)
    except Exception:
        log.exception("job %s: could not refresh its study (a GET of the study retries)", job_id)


def public_study(study: dict[str, Any], ms: list[dict[str, Any]]) -> dict[str, Any]:
    """A study as clients see it: its jobs (row, seed, state, AP), progress and report."""
    jobs_out = [{"row": m["row"], "method": m["method"], "seed": m["seed"], "job_id": m["job_id"],
                 "state": m["state"], "model_id": m["model_id"],
                 "AP": ((m["metrics"] or {}).get("bbox") or {}).get("AP"),
                 "progress": _fraction(m)} for m in ms]  # fmt: skip
    out = {k: v for k, v in study.items() if k not in ("idempotency_key",)}
    out["jobs"] = jobs_out
    out["progress"] = {"jobs": len(ms), "ended": sum(m["state"] in TERMINAL_STATES for m in ms)}
    return out


def _fraction(m: dict[str, Any]) -> float | None:
    """How far a job's training got (0-1), for progress displays."""
    if m["state"] in TERMINAL_STATES:
        return 1.0
    p = m["progress"] or {}
    return round(min(1.0, p["iter"] / p["total_iters"]), 3) if p.get("total_iters") and p.get("iter") else 0.0

"""Deleting what the service stores: a record and its files, refused while something still uses it. Torch-free.

What holds what:

- a dataset or an uploaded checkpoint: a queued or running job whose spec names it (a job that ended is
  history, and its row stays valid without the files);
- a model: a deployment that serves it now (``core.deployments.serving``), or a queued or running job that
  names it (its teacher);
- a job: only an ended one goes, and not one of a study (the study's report is made of its jobs: delete the
  study); its run folder (checkpoints, logs, ``model.pt``) and history go with it, its published models stay;
- a study: only an ended one, with its jobs and its report.

A refusal is :class:`Held` with the ids of the holders; nothing is changed then. The rows go first, in one
transaction, then the files: a crash in between leaves unreferenced files (found by their missing row), never
a row whose files are half gone. Each deletion is logged with the tenant that asked.

``prune_checkpoints`` applies ``LDD_KEEP_CHECKPOINTS``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select

from core import deployments, studies
from core.artifacts import artifacts_for, run_key
from core.schema import (
    checkpoints,
    dataset_images,
    datasets,
    job_history,
    jobs,
    models,
    study_jobs,
)
from core.schema import studies as studies_table
from core.settings import Settings
from core.store import ACTIVE_STATES, TERMINAL_STATES, Store

log = logging.getLogger("ldd.api")


class Held(Exception):
    """The resource is still used: ``holders`` names what uses it (ids, or ``tenant/name`` of deployments)."""

    def __init__(self, kind: str, id: str, holders: list[str], why: str):
        super().__init__(f"{kind} {id} {why}: {', '.join(holders)}")
        self.holders = holders


def active_jobs_naming(store: Store, id: str) -> list[str]:
    """Queued or running jobs whose spec names ``id`` anywhere (ids are unique random strings, so a mention is a
    use: dataset, teacher, initial checkpoint, whatever the spec's shape)."""
    with store._tx() as conn:
        rows = conn.execute(select(jobs.c.id, jobs.c.spec).where(jobs.c.state.in_(ACTIVE_STATES))).all()
    return [r.id for r in rows if id in (r.spec if isinstance(r.spec, str) else json.dumps(r.spec))]


def delete_dataset(store: Store, settings: Settings, dataset_id: str, tenant: str) -> None:
    if holders := active_jobs_naming(store, dataset_id):
        raise Held("dataset", dataset_id, holders, "is used by queued or running job(s)")
    row = store.get_dataset(dataset_id)
    with store._tx() as conn:
        conn.execute(delete(dataset_images).where(dataset_images.c.dataset_id == dataset_id))
        conn.execute(delete(datasets).where(datasets.c.id == dataset_id))
    _remove_key(settings, row and row["key"])
    log.info("deleted dataset %s (tenant %s)", dataset_id, tenant)


def delete_checkpoint(store: Store, settings: Settings, checkpoint_id: str, tenant: str) -> None:
    if holders := active_jobs_naming(store, checkpoint_id):
        raise Held("checkpoint", checkpoint_id, holders, "is used by queued or running job(s)")
    row = store.get_checkpoint(checkpoint_id)
    with store._tx() as conn:
        conn.execute(delete(checkpoints).where(checkpoints.c.id == checkpoint_id))
    _remove_key(settings, row and row["key"])
    log.info("deleted checkpoint %s (tenant %s)", checkpoint_id, tenant)


def delete_model(store: Store, settings: Settings, model_id: str, tenant: str) -> None:
    """The model's row and registry folder; an fp32 model takes its int8/fp16/... siblings with it."""
    siblings = [m for m in store.models_for_job(job_id) if m["fp32_id"] == model_id] if (
        job_id := (store.get_model(model_id) or {}).get("job_id")) else []  # fmt: skip
    ids = [model_id, *(m["id"] for m in siblings)]
    holders = [h for i in ids for h in deployments.serving(store, i)]
    if holders:
        raise Held("model", model_id, holders, "is served by deployment(s)")
    if holders := [h for i in ids for h in active_jobs_naming(store, i)]:
        raise Held("model", model_id, holders, "is used by queued or running job(s)")
    rows = [store.get_model(i) for i in ids]
    with store._tx() as conn:
        conn.execute(delete(models).where(models.c.id.in_(ids)))
    for row in rows:
        _remove_key(settings, row and row["key"])
    log.info("deleted model %s%s (tenant %s)", model_id, f" and {ids[1:]}" if ids[1:] else "", tenant)


def delete_job(store: Store, settings: Settings, job: dict[str, Any], tenant: str) -> None:
    """An ended job that belongs to no study: its row, history and run folder."""
    if job["state"] not in TERMINAL_STATES:
        raise Held("job", job["id"], [job["id"]], f"is {job['state']}: cancel it first, then delete it")
    if study := studies.study_of_job(store, job["id"]):
        raise Held("job", job["id"], [study], "belongs to a study: delete the study")
    _delete_jobs(store, settings, [job["id"]])
    log.info("deleted job %s (tenant %s)", job["id"], tenant)


def delete_study(store: Store, settings: Settings, study: dict[str, Any], tenant: str) -> None:
    """An ended study: its row, its jobs (rows, histories, run folders) and its report."""
    members = studies.members(store, study["id"])
    if running := [m["job_id"] for m in members if m["state"] in ACTIVE_STATES]:
        raise Held("study", study["id"], running, "has queued or running job(s): cancel it first")
    job_ids = [m["job_id"] for m in members]
    with store._tx() as conn:
        conn.execute(delete(study_jobs).where(study_jobs.c.study_id == study["id"]))
        conn.execute(delete(studies_table).where(studies_table.c.id == study["id"]))
    _delete_jobs(store, settings, job_ids)
    _remove(settings, studies.study_dir(settings, study["id"]))
    log.info("deleted study %s with %d job(s) (tenant %s)", study["id"], len(job_ids), tenant)


def _delete_jobs(store: Store, settings: Settings, job_ids: list[str]) -> None:
    with store._tx() as conn:
        conn.execute(delete(job_history).where(job_history.c.job_id.in_(job_ids)))
        conn.execute(delete(study_jobs).where(study_jobs.c.job_id.in_(job_ids)))
        conn.execute(delete(jobs).where(jobs.c.id.in_(job_ids), jobs.c.state.in_(TERMINAL_STATES)))
    for job_id in job_ids:
        _remove_key(settings, run_key(job_id))


def prune_checkpoints(store: Store, settings: Settings) -> list[str]:
    """``LDD_KEEP_CHECKPOINTS`` = N > 0: the training checkpoints (``runs/<job>/checkpoints/``: weights, optimiser,
    what a resume needs) of ended runs are kept for the newest N of them only; returns the keys removed. A run's
    final weights (``model.pt``, what a ``{"job": id}`` teacher reads) and its published models stay."""
    keep = settings.keep_checkpoints
    if keep <= 0:
        return []
    q = select(jobs.c.id).where(jobs.c.state.in_(TERMINAL_STATES)).order_by(
        jobs.c.finished_at.desc(), jobs.c.id.desc())  # fmt: skip
    with store._tx() as conn:
        ended = [r.id for r in conn.execute(q)]
    artifacts = artifacts_for(settings)
    with_checkpoints = [k for j in ended if artifacts.usage(k := run_key(j, "checkpoints"))]
    for key in with_checkpoints[keep:]:
        _remove_key(settings, key)
    return with_checkpoints[keep:]


def _remove_key(settings: Settings, key: str | None) -> None:
    """Remove a stored file or folder (``core.artifacts``) and this machine's copy of it."""
    if key:
        artifacts_for(settings).delete(key)


def _remove(settings: Settings, path: str | Path | None) -> None:
    """Remove a file or folder of the data folder (a study's report; a path outside it is not trusted)."""
    if not path:
        return
    target = Path(path).absolute()
    if not target.is_relative_to(settings.data_dir) or target == settings.data_dir:
        log.warning("not removing %s: outside the data folder %s", target, settings.data_dir)
        return
    if target.is_dir():
        shutil.rmtree(target, ignore_errors=True)
    else:
        target.unlink(missing_ok=True)

"""A job's history: the progress records its worker relayed (losses, learning rate, evaluation results), kept
in the store so that ``GET /v1/jobs/{id}/history`` can draw curves that survive a worker restart.

The store's ``jobs.progress`` holds the latest record only; this table holds each one, tagged with the attempt
that relayed it. A resumed attempt continues from its checkpoint's iteration, so what an earlier attempt
recorded past that point never happened as far as the model is concerned: the first record of the resumed
attempt removes those rows, and the curve continues from the resume point.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import sqlalchemy as sa
from sqlalchemy import delete, insert, select

from core.catalogue import Catalogue
from core.db import plain, utcnow
from core.schema import job_history

log = logging.getLogger("ldd.worker")


def append(store: Catalogue, job_id: str, attempt: int, record: dict[str, Any]) -> None:
    """Add one progress record (``distill.train``'s ``progress.json``) of ``attempt`` to the job's history.

    Rows of earlier attempts past this record's ``resumed_from_iter`` (0 when it started afresh) are removed
    in the same transaction: the resumed run replaces them.
    """
    iteration = int(record.get("iter") or 0)
    resumed_from = int(record.get("resumed_from_iter") or 0)
    with store._tx() as conn:
        conn.execute(
            delete(job_history).where(job_history.c.job_id == job_id, job_history.c.attempt < attempt,
                                      job_history.c.iter > resumed_from)
        )  # fmt: skip
        conn.execute(insert(job_history).values(job_id=job_id, attempt=int(attempt), iter=iteration,
                                                record=dict(record), created_at=utcnow()))  # fmt: skip


def record(store: Catalogue, job_id: str, attempt: int, progress: dict[str, Any], not_before: float) -> None:
    """:func:`append` for the worker's progress relay, best effort: a record written before ``not_before``
    (``time.time()`` when this attempt began; a ``progress.json`` left by an earlier attempt) is not this
    attempt's and is skipped, and a store error is logged, never raised (the curves must not stop a job)."""
    if float(progress.get("time", math.inf)) < not_before:
        return
    try:
        append(store, job_id, attempt, progress)
    except Exception as e:  # the store may be briefly unreachable; the job's lease logic handles that
        log.warning("job %s: history not recorded: %s", job_id, e)


def read(store: Catalogue, job_id: str, after: int = -1) -> list[dict[str, Any]]:
    """The job's records in run order (iteration, then arrival), those past iteration ``after``: each is the
    progress record with its ``attempt`` and ``recorded_at`` (ISO 8601, UTC) beside it."""
    q = (
        select(job_history.c.attempt, job_history.c.record, job_history.c.created_at)
        .where(job_history.c.job_id == job_id, job_history.c.iter > after)
        .order_by(job_history.c.iter, job_history.c.id)
    )
    with store._tx() as conn:
        rows = conn.execute(q).all()
    out = []
    for row in rows:
        meta = plain({"attempt": row.attempt, "recorded_at": row.created_at})
        out.append({**row.record, **meta})
    return out


def count(store: Catalogue, job_id: str) -> int:
    with store._tx() as conn:
        return int(conn.execute(select(sa.func.count()).where(job_history.c.job_id == job_id)).scalar_one())

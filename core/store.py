"""The job store: the service's source of truth (the catalogue of ``core.catalogue``, and the jobs).

SQLAlchemy 2 Core on SQLite (default, one machine) or PostgreSQL (by URL), schema by Alembic migrations
run on start (``core.db``). Every public method returns plain JSON-ready dicts (timestamps as ISO 8601
strings in UTC). The worker's lease protocol is built on conditional ``UPDATE ... WHERE <state is what I
expect>`` statements, which are atomic on both databases, so a job never runs twice at once however many
workers race for it:

    claim(job, owner)        queued (or running with an expired lease) -> running, attempts += 1
    heartbeat(job, owner)    extends the lease while ``owner`` still holds it
    finish(job, owner, st)   running -> st, only while ``owner`` still holds it
    release(job, owner)      running -> queued, the attempt not counted (a worker shutting down)
    requeue_expired()        running with an expired lease -> queued (or failed / cancelled)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import String, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from core.catalogue import Catalogue
from core.db import new_id, plain, utcnow
from core.schema import jobs, study_jobs
from core.tenants import DEFAULT_TENANT

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
ACTIVE_STATES = ("queued", "running")


class IdempotencyConflict(Exception):
    """The idempotency key was already used for a job with a different spec."""

    def __init__(self, key: str, job_id: str):
        super().__init__(f"Idempotency-Key {key!r} was already used by job {job_id} with a different body")
        self.key = key
        self.job_id = job_id


class TooManyActiveJobs(Exception):
    """The tenant already has ``limit`` queued or running jobs."""

    def __init__(self, tenant: str, active: int, limit: int):
        super().__init__(
            f"tenant {tenant!r} has {active} queued or running job(s); the limit is {limit} (LDD_MAX_ACTIVE_JOBS): "
            "wait for one to end or cancel one"
        )
        self.tenant, self.active, self.limit = tenant, active, limit


def spec_digest(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def job_row(spec: dict[str, Any], idempotency_key: str | None, tenant: str) -> dict[str, Any]:
    """The values of a new ``queued`` job's row (``Store.create_job``; a study inserts its jobs with these)."""
    return dict(id=new_id("job"), kind=str(spec.get("kind", "")), name=spec.get("name"), state="queued", spec=spec,
                spec_sha256=spec_digest(spec), attempts=0, cancel_requested=False, idempotency_key=idempotency_key,
                created_at=(now := utcnow()), updated_at=now, tenant=tenant)  # fmt: skip


# A job row with the study it belongs to (``core.studies``; None for most jobs).
_JOB_WITH_STUDY = select(jobs, study_jobs.c.study_id).outerjoin(study_jobs, study_jobs.c.job_id == jobs.c.id)


def _job(row: Any) -> dict[str, Any]:
    d = plain(row._mapping)
    d.pop("spec_sha256")
    d["cancel_requested"] = bool(d["cancel_requested"])
    return d


class Store(Catalogue):
    """The job store. ``url``: ``sqlite:///path.db`` or ``postgresql://user@host/db``."""

    # -- jobs -----------------------------------------------------------------------------------

    def create_job(
        self,
        spec: dict[str, Any],
        idempotency_key: str | None = None,
        *,
        tenant: str = DEFAULT_TENANT,
        max_active: int = 0,
    ) -> tuple[dict[str, Any], bool]:
        """A new ``queued`` job of ``tenant``, or (same tenant, key and spec) the job made before and ``False``.

        Raises ``IdempotencyConflict`` when the tenant used the key with a different spec, and
        ``TooManyActiveJobs`` when ``max_active`` > 0 and the tenant has that many queued or running jobs (a
        replay of an existing job is answered even then). Sending the broker message is the caller's business
        (``core.queue.enqueue``); the recovery loop re-sends it if it is lost, so a crash between the two
        loses nothing.
        """
        digest = spec_digest(spec)
        if idempotency_key is not None:
            existing = self._job_by_key(tenant, idempotency_key)
            if existing is not None:
                return self._same_or_conflict(existing, digest, idempotency_key), False
        values = job_row(spec, idempotency_key, tenant)
        try:
            with self.tenant_tx(tenant if max_active > 0 else None) as conn:
                if max_active > 0:
                    active = self.count_active(conn, tenant)
                    if active >= max_active:
                        raise TooManyActiveJobs(tenant, active, max_active)
                conn.execute(insert(jobs).values(**values))
        except IntegrityError:
            # Two requests with the same key raced; the other one's insert won.
            if idempotency_key is None:
                raise
            existing = self._job_by_key(tenant, idempotency_key)
            if existing is None:
                raise
            return self._same_or_conflict(existing, digest, idempotency_key), False
        job = self.get_job(values["id"])
        assert job is not None
        return job, True

    @contextmanager
    def tenant_tx(self, tenant: str | None) -> Iterator[Connection]:
        """A transaction that, given a ``tenant``, no other submit of that tenant runs beside: the count of its
        active jobs and the insert that follows are one step. PostgreSQL: a transaction-scoped advisory lock
        on the tenant; SQLite: the database's write lock, taken at BEGIN."""
        if tenant is None:
            with self._tx() as conn:
                yield conn
            return
        with self.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:t))"), {"t": "ldd-tenant:" + tenant})
            elif conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    @staticmethod
    def count_active(conn: Connection, tenant: str) -> int:
        q = select(sa.func.count()).where(jobs.c.tenant == tenant, jobs.c.state.in_(ACTIVE_STATES))
        return int(conn.execute(q).scalar_one())

    def count_active_jobs(self, tenant: str) -> int:
        """The tenant's queued and running jobs (what ``LDD_MAX_ACTIVE_JOBS`` limits)."""
        with self._tx() as conn:
            return self.count_active(conn, tenant)

    def _job_by_key(self, tenant: str, key: str) -> Any:
        with self._tx() as conn:
            return conn.execute(select(jobs).where(jobs.c.tenant == tenant, jobs.c.idempotency_key == key)).first()

    @staticmethod
    def _same_or_conflict(row: Any, digest: str, key: str) -> dict[str, Any]:
        if row.spec_sha256 != digest:
            raise IdempotencyConflict(key, row.id)
        return _job(row)

    def get_job(self, id: str) -> dict[str, Any] | None:
        with self._tx() as conn:
            row = conn.execute(_JOB_WITH_STUDY.where(jobs.c.id == id)).first()
        return None if row is None else _job(row)

    def list_jobs(
        self, state: str | None = None, limit: int = 100, offset: int = 0, tenant: str | None = None
    ) -> list[dict[str, Any]]:
        """Newest first; only ``tenant``'s unless None."""
        q = _JOB_WITH_STUDY.order_by(jobs.c.created_at.desc(), jobs.c.id.desc())
        if state is not None:
            q = q.where(jobs.c.state == state)
        if tenant is not None:
            q = q.where(jobs.c.tenant == tenant)
        with self._tx() as conn:
            rows = conn.execute(q.limit(limit).offset(offset)).all()
        return [_job(r) for r in rows]

    def count_jobs_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(JOB_STATES, 0)
        with self._tx() as conn:
            for state, n in conn.execute(select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)):
                counts[state] = int(n)
        return counts

    def request_cancel(self, id: str) -> dict[str, Any]:
        """Queued -> ``cancelled`` at once; running -> ``cancel_requested`` (its worker stops it).

        Finished jobs are left as they are. Raises ``KeyError`` for an unknown job.
        """
        now = utcnow()
        with self._tx() as conn:
            done = conn.execute(
                update(jobs)
                .where(jobs.c.id == id, jobs.c.state == "queued")
                .values(state="cancelled", cancel_requested=True, finished_at=now, updated_at=now,
                        error="cancelled before it started")
            ).rowcount  # fmt: skip
            if not done:
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id == id, jobs.c.state == "running")
                    .values(cancel_requested=True, updated_at=now)
                )
        job = self.get_job(id)
        if job is None:
            raise KeyError(id)
        return job

    # -- the worker's lease protocol ------------------------------------------------------------

    @staticmethod
    def _claimable(job_id: str, now: datetime) -> sa.ColumnElement[bool]:
        return sa.and_(
            jobs.c.id == job_id,
            jobs.c.cancel_requested.is_(False),
            sa.or_(
                jobs.c.state == "queued",
                sa.and_(jobs.c.state == "running", jobs.c.lease_expires_at < now),
            ),
        )

    def claim(
        self, job_id: str, owner: str, lease_seconds: float, *, max_attempts: int | None = None
    ) -> dict[str, Any] | None:
        """Take the job for ``owner``: only a queued job, or a running one whose lease expired.

        Atomic (one conditional UPDATE): of any number of racing workers exactly one gets the job.
        Increments ``attempts``. With ``max_attempts``, a job that has used them all is failed here
        (with the reason of its last attempt) instead of being claimed. Returns the claimed job or None.
        """
        now = utcnow()
        with self._tx() as conn:
            if max_attempts is not None:
                reason = sa.literal(f"gave up after {max_attempts} attempt(s); last: ", String) + sa.func.coalesce(
                    jobs.c.last_error, "unknown"
                )
                exhausted = conn.execute(
                    update(jobs)
                    .where(self._claimable(job_id, now), jobs.c.attempts >= max_attempts)
                    .values(state="failed", error=reason, lease_owner=None, lease_expires_at=None,
                            finished_at=now, updated_at=now)
                ).rowcount  # fmt: skip
                if exhausted:
                    return None
            claimed = conn.execute(
                update(jobs)
                .where(self._claimable(job_id, now))
                .values(
                    state="running", lease_owner=owner, lease_seconds=float(lease_seconds),
                    lease_expires_at=now + timedelta(seconds=lease_seconds), heartbeat_at=now,
                    attempts=jobs.c.attempts + 1, started_at=sa.func.coalesce(jobs.c.started_at, now),
                    finished_at=None, error=None, updated_at=now,
                )
            ).rowcount  # fmt: skip
            if claimed != 1:
                return None
            row = conn.execute(select(jobs).where(jobs.c.id == job_id)).first()
        return _job(row)

    def heartbeat(self, job_id: str, owner: str, progress: dict[str, Any] | None = None) -> bool:
        """Extend ``owner``'s lease (and store ``progress`` if given).

        False when the lease was lost (another worker or the recovery loop took the job) or a cancel
        was requested: either way the worker must stop the job.
        """
        now = utcnow()
        with self._tx() as conn:
            row = conn.execute(
                select(jobs.c.lease_seconds).where(jobs.c.id == job_id, jobs.c.lease_owner == owner)
            ).first()
            if row is None:
                return False
            values: dict[str, Any] = dict(
                lease_expires_at=now + timedelta(seconds=row.lease_seconds or 60.0), heartbeat_at=now,
                updated_at=now,
            )  # fmt: skip
            if progress is not None:
                values["progress"] = progress
            n = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.lease_owner == owner, jobs.c.state == "running")
                .values(**values)
            ).rowcount
            if n != 1:
                return False
            cancel = conn.execute(select(jobs.c.cancel_requested).where(jobs.c.id == job_id)).scalar_one()
        return not cancel

    def control(self, job_id: str, owner: str) -> str:
        """A read-only look for the worker's supervision loop: ``ok``, ``cancel`` or ``lost``."""
        with self._tx() as conn:
            row = conn.execute(
                select(jobs.c.state, jobs.c.lease_owner, jobs.c.cancel_requested).where(jobs.c.id == job_id)
            ).first()
        if row is None or row.state != "running" or row.lease_owner != owner:
            return "lost"
        return "cancel" if row.cancel_requested else "ok"

    def finish(self, job_id: str, owner: str, state: str, **fields: Any) -> dict[str, Any] | None:
        """End ``owner``'s attempt: ``state`` is succeeded, failed, cancelled, or queued (run it again).

        ``fields``: any of progress, metrics, error, last_error, model_id. Does nothing and returns
        None when ``owner`` no longer holds the job (its lease was lost).
        """
        allowed = {"progress", "metrics", "error", "last_error", "model_id"}
        if state not in JOB_STATES or state == "running":
            raise ValueError(f"bad final state {state!r}")
        if unknown := set(fields) - allowed:
            raise ValueError(f"unknown job fields {sorted(unknown)}")
        now = utcnow()
        values: dict[str, Any] = dict(fields, state=state, lease_owner=None, lease_expires_at=None, updated_at=now)
        values["finished_at"] = None if state == "queued" else now
        if state == "queued":
            values["enqueued_at"] = now
        with self._tx() as conn:
            n = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.lease_owner == owner, jobs.c.state == "running")
                .values(**values)
            ).rowcount
        return self.get_job(job_id) if n == 1 else None

    def release(self, job_id: str, owner: str, reason: str) -> dict[str, Any] | None:
        """Give a running job back to the queue without counting the attempt (its worker is shutting
        down cleanly, not failing). None when ``owner`` no longer holds it."""
        now = utcnow()
        with self._tx() as conn:
            n = conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.lease_owner == owner, jobs.c.state == "running")
                .values(state="queued", lease_owner=None, lease_expires_at=None, last_error=reason,
                        attempts=jobs.c.attempts - 1, enqueued_at=now, updated_at=now)
            ).rowcount  # fmt: skip
        return self.get_job(job_id) if n == 1 else None

    def requeue_expired(self, max_attempts: int | None = None) -> list[str]:
        """Running jobs whose lease expired (their worker died) go back to ``queued``; returns their ids.

        A job whose cancel was requested becomes ``cancelled`` instead, and with ``max_attempts`` a job
        that has used them all becomes ``failed`` with the reason. Each change is a conditional UPDATE
        on the lease it saw, so a heartbeat that arrives in between wins.
        """
        now = utcnow()
        with self._tx() as conn:
            expired = conn.execute(
                select(jobs.c.id, jobs.c.lease_owner, jobs.c.attempts, jobs.c.cancel_requested,
                       jobs.c.lease_expires_at)
                .where(jobs.c.state == "running", jobs.c.lease_expires_at < now)
            ).all()  # fmt: skip
        requeued: list[str] = []
        for job in expired:
            lost = f"attempt {job.attempts}: worker {job.lease_owner} stopped heartbeating (lease expired)"
            values: dict[str, Any]
            if job.cancel_requested:
                values = dict(state="cancelled", error="cancelled (its worker was lost)", finished_at=now)
            elif max_attempts is not None and job.attempts >= max_attempts:
                values = dict(
                    state="failed", last_error=lost, finished_at=now,
                    error=f"gave up after {job.attempts} attempt(s); last: {lost}",
                )  # fmt: skip
            else:
                values = dict(state="queued", last_error=lost, enqueued_at=now)
            with self._tx() as conn:
                n = conn.execute(
                    update(jobs)
                    .where(jobs.c.id == job.id, jobs.c.state == "running",
                           jobs.c.lease_owner == job.lease_owner, jobs.c.lease_expires_at < now)
                    .values(**values, lease_owner=None, lease_expires_at=None, updated_at=now)
                ).rowcount  # fmt: skip
            if n == 1 and values["state"] == "queued":
                requeued.append(job.id)
        return requeued

    def stale_queued(self, older_than_seconds: float, limit: int = 100) -> list[str]:
        """Queued jobs whose last broker message was sent (or which were created) long enough ago."""
        cutoff = utcnow() - timedelta(seconds=older_than_seconds)
        last_sent = sa.func.coalesce(jobs.c.enqueued_at, jobs.c.created_at)
        with self._tx() as conn:
            rows = conn.execute(
                select(jobs.c.id).where(jobs.c.state == "queued", last_sent < cutoff)
                .order_by(jobs.c.created_at).limit(limit)
            ).all()  # fmt: skip
        return [r.id for r in rows]

    def mark_enqueued(self, job_ids: list[str]) -> None:
        if not job_ids:
            return
        with self._tx() as conn:
            conn.execute(update(jobs).where(jobs.c.id.in_(job_ids)).values(enqueued_at=utcnow()))

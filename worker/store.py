"""The job store: the service's source of truth (datasets, checkpoints, jobs, models).

SQLAlchemy 2 on SQLite (default, one machine) or PostgreSQL (by URL). Every public method returns
plain JSON-ready dicts (timestamps as ISO 8601 strings in UTC). The worker's lease protocol is built
on conditional ``UPDATE ... WHERE <state is what I expect>`` statements, which are atomic on both
databases, so a job never runs twice at once however many workers race for it:

    claim(job, owner)        queued (or running with an expired lease) -> running, attempts += 1
    heartbeat(job, owner)    extends the lease while ``owner`` still holds it
    finish(job, owner, st)   running -> st, only while ``owner`` still holds it
    requeue_expired()        running with an expired lease -> queued (or failed / cancelled)
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import JSON, Boolean, DateTime, Float, Integer, String, Text, event, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")


class IdempotencyConflict(Exception):
    """The idempotency key was already used for a job with a different spec."""

    def __init__(self, key: str, job_id: str):
        super().__init__(f"Idempotency-Key {key!r} was already used by job {job_id} with a different body")
        self.key = key
        self.job_id = job_id


def _now() -> datetime:
    # Naive UTC everywhere: SQLite has no time zones, and naive values compare the same on both databases.
    return datetime.now(UTC).replace(tzinfo=None)


def _iso(dt: datetime | None) -> str | None:
    return None if dt is None else dt.replace(tzinfo=UTC).isoformat()


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


def spec_digest(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class Base(DeclarativeBase):
    pass


class DatasetRow(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(Text)
    classes: Mapped[list] = mapped_column(JSON)
    num_images: Mapped[int] = mapped_column(Integer)
    num_boxes: Mapped[int] = mapped_column(Integer)
    splits: Mapped[dict] = mapped_column(JSON)
    problems: Mapped[list] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    path: Mapped[str] = mapped_column(Text)
    arch: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str | None] = mapped_column(String(200), nullable=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    spec: Mapped[dict] = mapped_column(JSON)
    spec_sha256: Mapped[str] = mapped_column(String(64))
    progress: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    metrics: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Why the previous attempt ended (kept while the job is queued again); quoted when attempts run out.
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True, nullable=True)
    model_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # When a broker message was last sent for this job by the recovery loop (re-sends are rate-limited).
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class ModelRow(Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # Unique: a job publishes at most one model, whatever happens to its worker.
    job_id: Mapped[str | None] = mapped_column(String(64), unique=True, nullable=True)
    path: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime, index=True)


def _row_dict(row: Any, table: sa.Table) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for col in table.columns:
        v = getattr(row, col.key)
        out[col.key] = _iso(v) if isinstance(v, datetime) else v
    return out


def _dataset(row: Any) -> dict[str, Any]:
    return _row_dict(row, DatasetRow.__table__)


def _checkpoint(row: Any) -> dict[str, Any]:
    return _row_dict(row, CheckpointRow.__table__)


def _job(row: Any) -> dict[str, Any]:
    d = _row_dict(row, JobRow.__table__)
    d.pop("spec_sha256")
    d["cancel_requested"] = bool(d["cancel_requested"])
    return d


def _model(row: Any) -> dict[str, Any]:
    return _row_dict(row, ModelRow.__table__)


def normalise_url(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (psycopg2 is not a dependency)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str) -> Engine:
    url = normalise_url(url)
    if url.startswith("sqlite"):
        db = sa.engine.make_url(url).database
        if db and db != ":memory:":
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL: readers (the API) never block the writer (the worker); busy_timeout: writers queue
            # up instead of failing with "database is locked".
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def migrate(engine: Engine) -> None:
    """Create missing tables, then add missing (nullable) columns: the simple additive migration."""
    for attempt in range(3):
        try:
            Base.metadata.create_all(engine)
            break
        except (OperationalError, ProgrammingError, IntegrityError):
            # Another process created the same table at the same moment; look again.
            if attempt == 2:
                raise
            time.sleep(0.2)
    insp = sa.inspect(engine)
    for table in Base.metadata.sorted_tables:
        have = {c["name"] for c in insp.get_columns(table.name)}
        for col in table.columns:
            if col.name in have:
                continue
            ddl = f"ALTER TABLE {table.name} ADD COLUMN {col.name} {col.type.compile(engine.dialect)}"
            try:
                with engine.begin() as conn:
                    conn.execute(sa.text(ddl))
            except (OperationalError, ProgrammingError):
                if col.name not in {c["name"] for c in sa.inspect(engine).get_columns(table.name)}:
                    raise


class Store:
    """The job store. ``url``: ``sqlite:///path.db`` or ``postgresql://user@host/db``."""

    def __init__(self, url: str, *, create: bool = True):
        self.url = url
        self.engine = make_engine(url)
        if create:
            migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    def ping(self) -> bool:
        """True when the database answers (readiness)."""
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return True
        except Exception:
            return False

    # -- datasets -------------------------------------------------------------------------------

    def add_dataset(
        self,
        id: str,
        name: str,
        path: str,
        classes: list[str],
        num_images: int,
        num_boxes: int,
        splits: dict[str, Any],
        problems: list[str],
    ) -> dict[str, Any]:
        values = dict(
            id=id, name=name, path=str(path), classes=list(classes), num_images=int(num_images),
            num_boxes=int(num_boxes), splits=dict(splits), problems=list(problems), created_at=_now(),
        )  # fmt: skip
        with self._tx() as conn:
            conn.execute(sa.insert(DatasetRow).values(**values))
        return _dataset(_Obj(values))

    def get_dataset(self, id: str) -> dict[str, Any] | None:
        with self._tx() as conn:
            row = conn.execute(select(DatasetRow.__table__).where(DatasetRow.id == id)).first()
        return None if row is None else _dataset(row)

    def list_datasets(self) -> list[dict[str, Any]]:
        with self._tx() as conn:
            rows = conn.execute(
                select(DatasetRow.__table__).order_by(DatasetRow.created_at.desc(), DatasetRow.id)
            ).all()
        return [_dataset(r) for r in rows]

    # -- checkpoints ----------------------------------------------------------------------------

    def add_checkpoint(self, id: str, path: str, arch: dict[str, Any], name: str | None) -> dict[str, Any]:
        values = dict(id=id, path=str(path), arch=dict(arch), name=name, created_at=_now())
        with self._tx() as conn:
            conn.execute(sa.insert(CheckpointRow).values(**values))
        return _checkpoint(_Obj(values))

    def get_checkpoint(self, id: str) -> dict[str, Any] | None:
        with self._tx() as conn:
            row = conn.execute(select(CheckpointRow.__table__).where(CheckpointRow.id == id)).first()
        return None if row is None else _checkpoint(row)

    def list_checkpoints(self) -> list[dict[str, Any]]:
        with self._tx() as conn:
            rows = conn.execute(
                select(CheckpointRow.__table__).order_by(CheckpointRow.created_at.desc(), CheckpointRow.id)
            ).all()
        return [_checkpoint(r) for r in rows]

    # -- jobs -----------------------------------------------------------------------------------

    def create_job(self, spec: dict[str, Any], idempotency_key: str | None = None) -> tuple[dict[str, Any], bool]:
        """A new ``queued`` job, or (same key, same spec) the job made before and ``False``.

        Raises ``IdempotencyConflict`` when the key was used with a different spec. Sending the broker
        message is the caller's business (``worker.queue.enqueue``); the recovery loop re-sends it if
        it is lost, so a crash between the two loses nothing.
        """
        digest = spec_digest(spec)
        if idempotency_key is not None:
            existing = self._job_by_key(idempotency_key)
            if existing is not None:
                return self._same_or_conflict(existing, digest, idempotency_key), False
        now = _now()
        values = dict(
            id=new_id("job"), kind=str(spec.get("kind", "")), name=spec.get("name"), state="queued",
            spec=spec, spec_sha256=digest, attempts=0, cancel_requested=False,
            idempotency_key=idempotency_key, created_at=now, updated_at=now,
        )  # fmt: skip
        try:
            with self._tx() as conn:
                conn.execute(sa.insert(JobRow).values(**values))
        except IntegrityError:
            # Two requests with the same key raced; the other one's insert won.
            if idempotency_key is None:
                raise
            existing = self._job_by_key(idempotency_key)
            if existing is None:
                raise
            return self._same_or_conflict(existing, digest, idempotency_key), False
        job = self.get_job(values["id"])
        assert job is not None
        return job, True

    def _job_by_key(self, key: str) -> Any:
        with self._tx() as conn:
            return conn.execute(select(JobRow.__table__).where(JobRow.idempotency_key == key)).first()

    @staticmethod
    def _same_or_conflict(row: Any, digest: str, key: str) -> dict[str, Any]:
        if row.spec_sha256 != digest:
            raise IdempotencyConflict(key, row.id)
        return _job(row)

    def get_job(self, id: str) -> dict[str, Any] | None:
        with self._tx() as conn:
            row = conn.execute(select(JobRow.__table__).where(JobRow.id == id)).first()
        return None if row is None else _job(row)

    def list_jobs(self, state: str | None = None, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Newest first."""
        q = select(JobRow.__table__).order_by(JobRow.created_at.desc(), JobRow.id.desc())
        if state is not None:
            q = q.where(JobRow.state == state)
        with self._tx() as conn:
            rows = conn.execute(q.limit(limit).offset(offset)).all()
        return [_job(r) for r in rows]

    def count_jobs_by_state(self) -> dict[str, int]:
        counts = dict.fromkeys(JOB_STATES, 0)
        with self._tx() as conn:
            for state, n in conn.execute(select(JobRow.state, sa.func.count()).group_by(JobRow.state)):
                counts[state] = int(n)
        return counts

    def request_cancel(self, id: str) -> dict[str, Any]:
        """Queued -> ``cancelled`` at once; running -> ``cancel_requested`` (its worker stops it).

        Finished jobs are left as they are. Raises ``KeyError`` for an unknown job.
        """
        now = _now()
        with self._tx() as conn:
            done = conn.execute(
                update(JobRow)
                .where(JobRow.id == id, JobRow.state == "queued")
                .values(state="cancelled", cancel_requested=True, finished_at=now, updated_at=now,
                        error="cancelled before it started")
            ).rowcount  # fmt: skip
            if not done:
                conn.execute(
                    update(JobRow)
                    .where(JobRow.id == id, JobRow.state == "running")
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
            JobRow.id == job_id,
            JobRow.cancel_requested.is_(False),
            sa.or_(
                JobRow.state == "queued",
                sa.and_(JobRow.state == "running", JobRow.lease_expires_at < now),
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
        now = _now()
        with self._tx() as conn:
            if max_attempts is not None:
                reason = sa.literal(f"gave up after {max_attempts} attempt(s); last: ", String) + sa.func.coalesce(
                    JobRow.last_error, "unknown"
                )
                exhausted = conn.execute(
                    update(JobRow)
                    .where(self._claimable(job_id, now), JobRow.attempts >= max_attempts)
                    .values(state="failed", error=reason, lease_owner=None, lease_expires_at=None,
                            finished_at=now, updated_at=now)
                ).rowcount  # fmt: skip
                if exhausted:
                    return None
            claimed = conn.execute(
                update(JobRow)
                .where(self._claimable(job_id, now))
                .values(
                    state="running", lease_owner=owner, lease_seconds=float(lease_seconds),
                    lease_expires_at=now + timedelta(seconds=lease_seconds), heartbeat_at=now,
                    attempts=JobRow.attempts + 1, started_at=sa.func.coalesce(JobRow.started_at, now),
                    finished_at=None, error=None, updated_at=now,
                )
            ).rowcount  # fmt: skip
            if claimed != 1:
                return None
            row = conn.execute(select(JobRow.__table__).where(JobRow.id == job_id)).first()
        return _job(row)

    def heartbeat(self, job_id: str, owner: str, progress: dict[str, Any] | None = None) -> bool:
        """Extend ``owner``'s lease (and store ``progress`` if given).

        False when the lease was lost (another worker or the recovery loop took the job) or a cancel
        was requested: either way the worker must stop the job.
        """
        now = _now()
        with self._tx() as conn:
            row = conn.execute(
                select(JobRow.lease_seconds).where(JobRow.id == job_id, JobRow.lease_owner == owner)
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
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.lease_owner == owner, JobRow.state == "running")
                .values(**values)
            ).rowcount
            if n != 1:
                return False
            cancel = conn.execute(select(JobRow.cancel_requested).where(JobRow.id == job_id)).scalar_one()
        return not cancel

    def control(self, job_id: str, owner: str) -> str:
        """A read-only look for the worker's supervision loop: ``ok``, ``cancel`` or ``lost``."""
        with self._tx() as conn:
            row = conn.execute(
                select(JobRow.state, JobRow.lease_owner, JobRow.cancel_requested).where(JobRow.id == job_id)
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
        now = _now()
        values: dict[str, Any] = dict(fields, state=state, lease_owner=None, lease_expires_at=None, updated_at=now)
        values["finished_at"] = None if state == "queued" else now
        if state == "queued":
            values["enqueued_at"] = now
        with self._tx() as conn:
            n = conn.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.lease_owner == owner, JobRow.state == "running")
                .values(**values)
            ).rowcount
        return self.get_job(job_id) if n == 1 else None

    def release(self, job_id: str, owner: str, reason: str) -> dict[str, Any] | None:
        """Give a running job back to the queue without counting the attempt (its worker is shutting
        down cleanly, not failing). None when ``owner`` no longer holds it."""
        now = _now()
        with self._tx() as conn:
            n = conn.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.lease_owner == owner, JobRow.state == "running")
                .values(state="queued", lease_owner=None, lease_expires_at=None, last_error=reason,
                        attempts=JobRow.attempts - 1, enqueued_at=now, updated_at=now)
            ).rowcount  # fmt: skip
        return self.get_job(job_id) if n == 1 else None

    def requeue_expired(self, max_attempts: int | None = None) -> list[str]:
        """Running jobs whose lease expired (their worker died) go back to ``queued``; returns their ids.

        A job whose cancel was requested becomes ``cancelled`` instead, and with ``max_attempts`` a job
        that has used them all becomes ``failed`` with the reason. Each change is a conditional UPDATE
        on the lease it saw, so a heartbeat that arrives in between wins.
        """
        now = _now()
        with self._tx() as conn:
            expired = conn.execute(
                select(JobRow.id, JobRow.lease_owner, JobRow.attempts, JobRow.cancel_requested,
                       JobRow.lease_expires_at)
                .where(JobRow.state == "running", JobRow.lease_expires_at < now)
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
                    update(JobRow)
                    .where(JobRow.id == job.id, JobRow.state == "running",
                           JobRow.lease_owner == job.lease_owner, JobRow.lease_expires_at < now)
                    .values(**values, lease_owner=None, lease_expires_at=None, updated_at=now)
                ).rowcount  # fmt: skip
            if n == 1 and values["state"] == "queued":
                requeued.append(job.id)
        return requeued

    def stale_queued(self, older_than_seconds: float, limit: int = 100) -> list[str]:
        """Queued jobs whose last broker message was sent (or which were created) long enough ago."""
        cutoff = _now() - timedelta(seconds=older_than_seconds)
        last_sent = sa.func.coalesce(JobRow.enqueued_at, JobRow.created_at)
        with self._tx() as conn:
            rows = conn.execute(
                select(JobRow.id).where(JobRow.state == "queued", last_sent < cutoff)
                .order_by(JobRow.created_at).limit(limit)
            ).all()  # fmt: skip
        return [r.id for r in rows]

    def mark_enqueued(self, job_ids: list[str]) -> None:
        if not job_ids:
            return
        with self._tx() as conn:
            conn.execute(update(JobRow).where(JobRow.id.in_(job_ids)).values(enqueued_at=_now()))

    # -- models ---------------------------------------------------------------------------------

    def add_model(self, id: str, job_id: str | None, path: str, meta: dict[str, Any]) -> dict[str, Any]:
        """Record a published model. Idempotent: adding the same id (or a second model for the same
        job) returns the model already recorded."""
        values = dict(id=id, job_id=job_id, path=str(path), meta=dict(meta), created_at=_now())
        try:
            with self._tx() as conn:
                conn.execute(sa.insert(ModelRow).values(**values))
        except IntegrityError:
            existing = self.get_model(id) or (self.model_for_job(job_id) if job_id else None)
            if existing is None:
                raise
            return existing
        got = self.get_model(id)
        assert got is not None
        return got

    def get_model(self, id: str) -> dict[str, Any] | None:
        with self._tx() as conn:
            row = conn.execute(select(ModelRow.__table__).where(ModelRow.id == id)).first()
        return None if row is None else _model(row)

    def model_for_job(self, job_id: str) -> dict[str, Any] | None:
        with self._tx() as conn:
            row = conn.execute(select(ModelRow.__table__).where(ModelRow.job_id == job_id)).first()
        return None if row is None else _model(row)

    def list_models(self) -> list[dict[str, Any]]:
        """Newest first."""
        with self._tx() as conn:
            rows = conn.execute(
                select(ModelRow.__table__).order_by(ModelRow.created_at.desc(), ModelRow.id.desc())
            ).all()
        return [_model(r) for r in rows]

    def newest_model(self) -> dict[str, Any] | None:
        with self._tx() as conn:
            row = conn.execute(
                select(ModelRow.__table__).order_by(ModelRow.created_at.desc(), ModelRow.id.desc()).limit(1)
            ).first()
        return None if row is None else _model(row)


class _Obj:
    """Attribute access over the values just inserted (saves a read back)."""

    def __init__(self, values: dict[str, Any]):
        self.__dict__.update(values)

"""The job store's tables (SQLAlchemy Core). Torch-free.

This is the schema the code expects; the database gets it through the Alembic migrations in
``core/migrations/versions`` (``core.db.migrate``), and ``tests/test_migrations.py`` checks that the two
agree. A change here needs a new migration.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy import JSON, Boolean, Column, DateTime, Float, Integer, MetaData, String, Table, Text, UniqueConstraint

from core.tenants import DEFAULT_TENANT

metadata = MetaData()


def tenant_column() -> Column:
    """The tenant that created the row (``core.tenants``); rows older than tenants are the default's."""
    return Column("tenant", String(64), nullable=False, server_default=DEFAULT_TENANT, index=True)


datasets = Table(
    "datasets", metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("key", Text, nullable=False),  # core.artifacts: datasets/<id>, checkpoints/<id>.pt, models/<id>
    Column("classes", JSON, nullable=False),
    Column("num_images", Integer, nullable=False),
    Column("num_boxes", Integer, nullable=False),
    Column("splits", JSON, nullable=False),
    Column("problems", JSON, nullable=False),
    Column("created_at", DateTime, nullable=False),
    tenant_column(),
    # The split every job on the data set uses (DESIGN section 4): for a data set whose images name no validation
    # or test split, the seeded draw made at upload (``distill.data.annotations.split``); both null when the
    # images' own split decides, or for a row added without a split (tests, a folder gone before 0006).
    Column("val_split", Float, nullable=True),
    Column("split_seed", Integer, nullable=True),
)  # fmt: skip

# Each image of a data set: its content hash (sha256 of the file) and its part of the data set's split ("train",
# "val", or "test": held out). The job check compares a teacher's training images with a job's validation images
# by hash, so the same picture in another data set is caught too.
dataset_images = Table(
    "dataset_images", metadata,
    Column("dataset_id", String(64), primary_key=True),
    Column("image_id", Integer, primary_key=True),
    Column("file_name", Text, nullable=False),
    Column("sha256", String(64), nullable=False, index=True),
    Column("split", String(8), nullable=False),
)  # fmt: skip

checkpoints = Table(
    "checkpoints", metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=True),
    Column("key", Text, nullable=False),  # core.artifacts: datasets/<id>, checkpoints/<id>.pt, models/<id>
    # What the torch-free checkpoint reader found: kind, architecture, classes, ...
    Column("arch", JSON, nullable=False),
    Column("created_at", DateTime, nullable=False),
    tenant_column(),
)  # fmt: skip

jobs = Table(
    "jobs", metadata,
    Column("id", String(64), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("name", String(200), nullable=True),
    Column("state", String(16), nullable=False, index=True),
    Column("spec", JSON, nullable=False),
    Column("spec_sha256", String(64), nullable=False),
    Column("progress", JSON, nullable=True),
    Column("metrics", JSON, nullable=True),
    Column("error", Text, nullable=True),
    # Why the previous attempt ended (kept while the job is queued again); quoted when attempts run out.
    Column("last_error", Text, nullable=True),
    Column("attempts", Integer, nullable=False),
    Column("lease_owner", String(200), nullable=True),
    Column("lease_seconds", Float, nullable=True),
    Column("lease_expires_at", DateTime, nullable=True),
    Column("heartbeat_at", DateTime, nullable=True),
    Column("cancel_requested", Boolean, nullable=False),
    # Unique per tenant: one tenant's key neither collides with nor reveals another's.
    Column("idempotency_key", String(255), nullable=True),
    Column("model_id", String(64), nullable=True),
    # When a broker message was last sent for this job by the recovery loop (re-sends are rate-limited).
    Column("enqueued_at", DateTime, nullable=True),
    Column("created_at", DateTime, nullable=False, index=True),
    Column("started_at", DateTime, nullable=True),
    Column("finished_at", DateTime, nullable=True),
    Column("updated_at", DateTime, nullable=False),
    tenant_column(),
    UniqueConstraint("tenant", "idempotency_key", name="uq_jobs_tenant_idempotency_key"),
    # A job from before data sets had their split (migration 0006) drew validation with its own val_split and
    # training seed: ``{"val_split", "seed"}`` when that draw differs from its data set's stored split, so the
    # job check knows what it trained on as a teacher; null: the job used its data set's split.
    Column("split_draw", JSON, nullable=True),
)  # fmt: skip

# The catalogue of published models: ``meta`` is the model's description (architecture, classes, input
# size, metrics, export details, sha256); the stored folder at ``key`` holds only what serving needs.
# A job publishes one model per precision: its fp32 model (the job's ``model_id``) and, when asked, int8 and
# fp16 siblings that name the fp32 one in ``fp32_id``.
models = Table(
    "models", metadata,
    Column("id", String(64), primary_key=True),
    Column("job_id", String(64), nullable=True),
    Column("key", Text, nullable=False),  # core.artifacts: datasets/<id>, checkpoints/<id>.pt, models/<id>
    Column("meta", JSON, nullable=False),
    Column("created_at", DateTime, nullable=False, index=True),
    tenant_column(),  # the tenant of the job that made it
    Column("format", String(8), nullable=False, server_default="fp32"),
    Column("fp32_id", String(64), nullable=True),
    # One model per job and precision, whatever happens to its worker (rows without a job are not limited).
    UniqueConstraint("job_id", "format", name="uq_models_job_id_format"),
)  # fmt: skip

# A job's run over time (``core.history``): one row per progress record the worker relayed (losses, learning
# rate, evaluation results), kept apart from ``jobs.progress`` (the latest only) so the curves survive restarts.
job_history = Table(
    "job_history", metadata,
    Column("id", sa.BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("job_id", String(64), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("iter", Integer, nullable=False),
    Column("record", JSON, nullable=False),
    Column("created_at", DateTime, nullable=False),
    sa.Index("ix_job_history_job_id_iter", "job_id", "iter"),
)  # fmt: skip

# A study (``core.studies``): the plain student and each method row, each over N seeds, run as ordinary jobs;
# ``report`` is written once, when every one of its jobs has ended (``finished_at`` set at the same moment).
studies = Table(
    "studies", metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(200), nullable=True),
    Column("state", String(16), nullable=False),
    Column("spec", JSON, nullable=False),
    Column("spec_sha256", String(64), nullable=False),
    Column("idempotency_key", String(255), nullable=True),
    Column("cancel_requested", Boolean, nullable=False),
    Column("report", JSON, nullable=True),
    Column("created_at", DateTime, nullable=False, index=True),
    Column("finished_at", DateTime, nullable=True),
    tenant_column(),
    UniqueConstraint("tenant", "idempotency_key", name="uq_studies_tenant_idempotency_key"),
)  # fmt: skip

# Which study a job belongs to, and its place there: the row (a method row's name, or "student alone") and seed.
# A table of its own rather than columns on ``jobs``: jobs stay as they are, and most have no study.
study_jobs = Table(
    "study_jobs", metadata,
    Column("job_id", String(64), primary_key=True),
    Column("study_id", String(64), nullable=False, index=True),
    Column("position", Integer, nullable=False),
    Column("row_name", String(200), nullable=False),
    Column("method", String(32), nullable=True),
    Column("seed", Integer, nullable=False),
)  # fmt: skip

# A deployment (``core.deployments``): a tenant's stable name for "the model that serves this", pointing at one
# of its versions; ``version`` is the current one (a rollback moves it back without forgetting the later ones).
deployments = Table(
    "deployments", metadata,
    Column("id", String(64), primary_key=True),
    Column("name", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    Column("updated_by", String(64), nullable=False),
    tenant_column(),
    UniqueConstraint("tenant", "name", name="uq_deployments_tenant_name"),
)  # fmt: skip

# Every version a deployment had: which model, when, by whom (the tenant's key name). Never rewritten.
deployment_versions = Table(
    "deployment_versions", metadata,
    Column("deployment_id", String(64), primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("model_id", String(64), nullable=False, index=True),
    Column("created_at", DateTime, nullable=False),
    Column("created_by", String(64), nullable=False),
)  # fmt: skip

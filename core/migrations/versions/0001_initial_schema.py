"""The job store as it was when migrations began: datasets, checkpoints, jobs, models.

Also adopts a store made before migrations existed (tables but no ``alembic_version``): the tables and
indexes it has are kept with their rows, and the ones it lacks are created. A column it lacks is added
as that code's ``ALTER TABLE`` added it: nullable, since the table may already hold rows. A store made by
the code just before migrations has every column, and ends up with the same schema as a fresh database.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _tables() -> dict[str, list[sa.Column | sa.Constraint]]:
    """The schema of this revision (frozen here: ``core.schema`` may move on in later revisions)."""
    return {
        "datasets": [
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("name", sa.String(200), nullable=False),
            sa.Column("path", sa.Text, nullable=False),
            sa.Column("classes", sa.JSON, nullable=False),
            sa.Column("num_images", sa.Integer, nullable=False),
            sa.Column("num_boxes", sa.Integer, nullable=False),
            sa.Column("splits", sa.JSON, nullable=False),
            sa.Column("problems", sa.JSON, nullable=False),
            sa.Column("created_at", sa.DateTime, nullable=False),
        ],
        "checkpoints": [
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("name", sa.String(200), nullable=True),
            sa.Column("path", sa.Text, nullable=False),
            sa.Column("arch", sa.JSON, nullable=False),
            sa.Column("created_at", sa.DateTime, nullable=False),
        ],
        "jobs": [
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("kind", sa.String(16), nullable=False),
            sa.Column("name", sa.String(200), nullable=True),
            sa.Column("state", sa.String(16), nullable=False),
            sa.Column("spec", sa.JSON, nullable=False),
            sa.Column("spec_sha256", sa.String(64), nullable=False),
            sa.Column("progress", sa.JSON, nullable=True),
            sa.Column("metrics", sa.JSON, nullable=True),
            sa.Column("error", sa.Text, nullable=True),
            sa.Column("last_error", sa.Text, nullable=True),
            sa.Column("attempts", sa.Integer, nullable=False),
            sa.Column("lease_owner", sa.String(200), nullable=True),
            sa.Column("lease_seconds", sa.Float, nullable=True),
            sa.Column("lease_expires_at", sa.DateTime, nullable=True),
            sa.Column("heartbeat_at", sa.DateTime, nullable=True),
            sa.Column("cancel_requested", sa.Boolean, nullable=False),
            sa.Column("idempotency_key", sa.String(255), nullable=True),
            sa.Column("model_id", sa.String(64), nullable=True),
            sa.Column("enqueued_at", sa.DateTime, nullable=True),
            sa.Column("created_at", sa.DateTime, nullable=False),
            sa.Column("started_at", sa.DateTime, nullable=True),
            sa.Column("finished_at", sa.DateTime, nullable=True),
            sa.Column("updated_at", sa.DateTime, nullable=False),
            sa.UniqueConstraint("idempotency_key"),
        ],
        "models": [
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("job_id", sa.String(64), nullable=True),
            sa.Column("path", sa.Text, nullable=False),
            sa.Column("meta", sa.JSON, nullable=False),
            sa.Column("created_at", sa.DateTime, nullable=False),
            sa.UniqueConstraint("job_id"),
        ],
    }


INDEXES = {"ix_jobs_state": ("jobs", "state"), "ix_jobs_created_at": ("jobs", "created_at"),
           "ix_models_created_at": ("models", "created_at")}  # fmt: skip


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for name, parts in _tables().items():
        if not inspector.has_table(name):
            op.create_table(name, *parts)
            continue
        have = {c["name"] for c in inspector.get_columns(name)}
        for col in (p for p in parts if isinstance(p, sa.Column) and p.name not in have):
            # Nullable, as the code before migrations added it: the table may hold rows without a value.
            op.add_column(name, sa.Column(col.name, col.type, nullable=True))
    for index, (table, column) in INDEXES.items():
        if index not in {i["name"] for i in inspector.get_indexes(table)}:
            op.create_index(index, table, [column])


def downgrade() -> None:
    for name in ("models", "jobs", "checkpoints", "datasets"):
        op.drop_table(name)

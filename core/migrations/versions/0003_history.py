"""A job's history: every progress record the worker relayed (losses, learning rate, evaluation results), for
the curves of ``GET /v1/jobs/{id}/history`` and the web UI. A new table; nothing else changes.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_history",
        # SQLite makes only an INTEGER PRIMARY KEY an auto-incremented rowid.
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("iter", sa.Integer, nullable=False),
        sa.Column("record", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
    )
    op.create_index("ix_job_history_job_id_iter", "job_history", ["job_id", "iter"])


def downgrade() -> None:
    op.drop_index("ix_job_history_job_id_iter", "job_history")
    op.drop_table("job_history")

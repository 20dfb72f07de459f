"""Studies (``core.studies``): a comparison of the plain student and each method over N seeds, run as ordinary
jobs. Two new tables; ``jobs`` is unchanged (a job's study and place in it live in ``study_jobs``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

DEFAULT_TENANT = "default"  # frozen here: core.tenants.DEFAULT_TENANT at the time of this revision


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("spec", sa.JSON, nullable=False),
        sa.Column("spec_sha256", sa.String(64), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("report", sa.JSON, nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime, nullable=True),
        sa.Column("tenant", sa.String(64), nullable=False, server_default=DEFAULT_TENANT),
        sa.UniqueConstraint("tenant", "idempotency_key", name="uq_studies_tenant_idempotency_key"),
    )
    op.create_index("ix_studies_created_at", "studies", ["created_at"])
    op.create_index("ix_studies_tenant", "studies", ["tenant"])
    op.create_table(
        "study_jobs",
        sa.Column("job_id", sa.String(64), primary_key=True),
        sa.Column("study_id", sa.String(64), nullable=False),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("row_name", sa.String(200), nullable=False),
        sa.Column("method", sa.String(32), nullable=True),
        sa.Column("seed", sa.Integer, nullable=False),
    )
    op.create_index("ix_study_jobs_study_id", "study_jobs", ["study_id"])


def downgrade() -> None:
    op.drop_index("ix_study_jobs_study_id", "study_jobs")
    op.drop_table("study_jobs")
    op.drop_index("ix_studies_tenant", "studies")
    op.drop_index("ix_studies_created_at", "studies")
    op.drop_table("studies")

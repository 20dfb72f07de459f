"""Deployments (``core.deployments``): a tenant's named pointer to a model, and the versions it had. Two new
tables; nothing else changes.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

DEFAULT_TENANT = "default"  # frozen here: core.tenants.DEFAULT_TENANT at the time of this revision


def upgrade() -> None:
    op.create_table(
        "deployments",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("updated_at", sa.DateTime, nullable=False),
        sa.Column("updated_by", sa.String(64), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False, server_default=DEFAULT_TENANT),
        sa.UniqueConstraint("tenant", "name", name="uq_deployments_tenant_name"),
    )
    op.create_index("ix_deployments_tenant", "deployments", ["tenant"])
    op.create_table(
        "deployment_versions",
        sa.Column("deployment_id", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("model_id", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("created_by", sa.String(64), nullable=False),
    )
    op.create_index("ix_deployment_versions_model_id", "deployment_versions", ["model_id"])


def downgrade() -> None:
    op.drop_index("ix_deployment_versions_model_id", "deployment_versions")
    op.drop_table("deployment_versions")
    op.drop_index("ix_deployments_tenant", "deployments")
    op.drop_table("deployments")

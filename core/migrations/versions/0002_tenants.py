"""Tenants: every dataset, checkpoint, job and model belongs to one (``core.tenants``).

- a ``tenant`` column (NOT NULL, indexed) on the four tables; the rows already there go to the default
  tenant, so a store upgraded from a single-tenant service keeps every row and serves it as before;
- a job's ``Idempotency-Key`` becomes unique per tenant instead of across the service: one tenant's key
  must neither collide with another's nor answer with another tenant's job.

SQLite cannot drop a constraint in place: the jobs table is copied (Alembic's batch mode) from its
reflected self minus the old unique constraint, every row and column order kept. PostgreSQL alters it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

DEFAULT_TENANT = "default"  # frozen here: core.tenants.DEFAULT_TENANT at the time of this revision
TABLES = ("datasets", "checkpoints", "jobs", "models")
UNIQUE_KEY = "uq_jobs_tenant_idempotency_key"


def _tenant() -> sa.Column:
    return sa.Column("tenant", sa.String(64), nullable=False, server_default=DEFAULT_TENANT)


def _is_old_unique(constraint: object) -> bool:
    return isinstance(constraint, sa.UniqueConstraint) and [c.name for c in constraint.columns] == ["idempotency_key"]


def upgrade() -> None:
    bind = op.get_bind()
    for table in ("datasets", "checkpoints", "models"):
        op.add_column(table, _tenant())
    if bind.dialect.name == "sqlite":
        jobs = sa.Table("jobs", sa.MetaData(), autoload_with=bind)
        for constraint in [c for c in jobs.constraints if _is_old_unique(c)]:
            jobs.constraints.remove(constraint)
        with op.batch_alter_table("jobs", copy_from=jobs, recreate="always") as batch:
            batch.add_column(_tenant())
            batch.create_unique_constraint(UNIQUE_KEY, ["tenant", "idempotency_key"])
    else:
        for uc in sa.inspect(bind).get_unique_constraints("jobs"):
            if uc["column_names"] == ["idempotency_key"]:
                op.drop_constraint(uc["name"], "jobs", type_="unique")
        op.add_column("jobs", _tenant())
        op.create_unique_constraint(UNIQUE_KEY, "jobs", ["tenant", "idempotency_key"])
    for table in TABLES:
        op.create_index(f"ix_{table}_tenant", table, ["tenant"])


def downgrade() -> None:
    for table in TABLES:
        op.drop_index(f"ix_{table}_tenant", table)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint(UNIQUE_KEY, type_="unique")
        batch.drop_column("tenant")
        batch.create_unique_constraint("jobs_idempotency_key_key", ["idempotency_key"])
    for table in ("datasets", "checkpoints", "models"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("tenant")

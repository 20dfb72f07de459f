"""A model's precision and its fp32 sibling as columns: ``models.format`` and ``models.fp32_id``.

Before this revision a job's int8 and fp16 models were rows without a ``job_id`` (it was unique, one row per
job), naming their job, precision and fp32 sibling in ``meta``. Now every model of a job carries the
``job_id``, and the uniqueness is per job and precision. The rows already there are filled in from their
``meta``: rows whose meta says int8 or fp16 get that format, their fp32 sibling and their job; every other
row is an fp32 model.

SQLite cannot drop a constraint in place: the table is copied (Alembic's batch mode) from its reflected self
minus the old unique constraint, every row kept. PostgreSQL alters it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UNIQUE_KEY = "uq_models_job_id_format"
SIBLING_FORMATS = ("int8", "fp16")  # frozen here: the formats that were siblings at the time of this revision


def _is_job_unique(constraint: object) -> bool:
    return isinstance(constraint, sa.UniqueConstraint) and [c.name for c in constraint.columns] == ["job_id"]


def _new_columns() -> list[sa.Column]:
    return [sa.Column("format", sa.String(8), nullable=False, server_default="fp32"),
            sa.Column("fp32_id", sa.String(64), nullable=True)]  # fmt: skip


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        models = sa.Table("models", sa.MetaData(), autoload_with=bind)
        for constraint in [c for c in models.constraints if _is_job_unique(c)]:
            models.constraints.remove(constraint)
        with op.batch_alter_table("models", copy_from=models, recreate="always") as batch:
            for column in _new_columns():
                batch.add_column(column)
            batch.create_unique_constraint(UNIQUE_KEY, ["job_id", "format"])
    else:
        for uc in sa.inspect(bind).get_unique_constraints("models"):
            if uc["column_names"] == ["job_id"]:
                op.drop_constraint(uc["name"], "models", type_="unique")
        for column in _new_columns():
            op.add_column("models", column)
        op.create_unique_constraint(UNIQUE_KEY, "models", ["job_id", "format"])
    _fill_in_siblings(bind)


def _fill_in_siblings(bind: sa.Connection) -> None:
    table = sa.table("models", sa.column("id"), sa.column("meta"), sa.column("job_id"), sa.column("format"),
                     sa.column("fp32_id"))  # fmt: skip
    for id_, meta in bind.execute(sa.select(table.c.id, table.c.meta)).all():
        meta = json.loads(meta) if isinstance(meta, str) else (meta or {})
        if meta.get("format") in SIBLING_FORMATS:
            bind.execute(sa.update(table).where(table.c.id == id_).values(
                format=meta["format"], fp32_id=meta.get("fp32_id"), job_id=meta.get("job_id")))  # fmt: skip


def downgrade() -> None:
    table = sa.table("models", sa.column("job_id"), sa.column("format"))
    op.execute(sa.update(table).where(table.c.format != "fp32").values(job_id=None))  # their meta names the job
    with op.batch_alter_table("models") as batch:
        batch.drop_constraint(UNIQUE_KEY, type_="unique")
        batch.drop_column("fp32_id")
        batch.drop_column("format")
        batch.create_unique_constraint("models_job_id_key", ["job_id"])

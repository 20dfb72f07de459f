"""Storage keys instead of absolute paths: ``datasets.path``, ``checkpoints.path`` and ``models.path`` become
``key`` (``core.artifacts``: ``datasets/<id>``, ``checkpoints/<id>.pt``, ``models/<id>``), so that a row means
the same file on every machine and with object storage.

An existing row held an absolute path under the data folder of the machine that wrote it
(``/data/datasets/ds_x``). Its key is the part from the last ``datasets/``, ``checkpoints/`` or ``models/``
component on, which is the same file under the same ``LDD_DATA_DIR``; a path with no such component (written by
hand) keeps the key its id gives, and says so in the log.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08
"""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")

# Frozen here: core.artifacts' layout at the time of this revision (table -> folder, key of an id).
LAYOUT = {
    "datasets": ("datasets", "datasets/{id}"),
    "checkpoints": ("checkpoints", "checkpoints/{id}.pt"),
    "models": ("models", "models/{id}"),
}


def key_of(path: str, folder: str, default: str) -> str:
    """``/data/x/datasets/ds_1`` -> ``datasets/ds_1``; an already relative key stays as it is."""
    parts = path.replace("\\", "/").split("/")
    if not path.startswith("/") and parts and parts[0] == folder and ".." not in parts:
        return path
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == folder and i + 1 < len(parts) and all(p not in ("", ".", "..") for p in parts[i + 1 :]):
            return "/".join(parts[i:])
    log.warning("storage key for %r: no %s/ folder in it; using %r", path, folder, default)
    return default


def upgrade() -> None:
    bind = op.get_bind()
    for table, (folder, pattern) in LAYOUT.items():
        with op.batch_alter_table(table) as batch:
            batch.alter_column("path", new_column_name="key", existing_type=sa.Text, existing_nullable=False)
        t = sa.table(table, sa.column("id", sa.String), sa.column("key", sa.Text))
        for row_id, path in bind.execute(sa.select(t.c.id, t.c.key)).all():
            key = key_of(path, folder, pattern.format(id=row_id))
            if key != path:
                bind.execute(t.update().where(t.c.id == row_id).values(key=key))


def downgrade() -> None:
    # Keys are relative to the data folder, which this revision cannot know: they stay relative paths.
    for table in LAYOUT:
        with op.batch_alter_table(table) as batch:
            batch.alter_column("key", new_column_name="path", existing_type=sa.Text, existing_nullable=False)

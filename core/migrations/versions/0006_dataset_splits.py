"""The split belongs to the data set: ``datasets.val_split`` and ``datasets.split_seed``, the ``dataset_images``
table (each image's content hash and part of the split) and ``jobs.split_draw``.

Before this revision a data set whose images name no validation or test split was split by each job, with the
job's ``val_split`` and its training seed, so jobs with other seeds validated on other images. Now the split is
drawn once, at upload, and stored. The data sets already there keep a split their jobs used:

- images that name a validation or test split: that split (``val_split`` and ``split_seed`` stay null);
- otherwise the draw the old code made with seed 0 and the ``val_split`` their jobs used (0.2, the old default,
  unless every job of the data set gave the same other value). Seed 0 is the honest choice: it is the default
  seed, so it is the split of a data set's first jobs and of every job that left the seed out; a job that drew
  another split (another seed or val_split) keeps it recorded in ``jobs.split_draw``, so the job check still
  knows which images it trained on when it teaches.

Each image's content hash is read from the data set's folder (the whole folder is read once, here: minutes for a
data set of 100 000 images). A data set whose folder or annotation file is gone gets no image rows; the job check
cannot compare its images, so a teacher trained on it is not refused (as an uploaded checkpoint is not).

The draw and the image lookup are frozen here as ``distill.data.annotations`` had them at this revision.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

DEFAULT_VAL_SPLIT = 0.2  # JobSpec.val_split's default before this revision
VAL_NAMES = frozenset({"val", "valid", "validation"})
TEST_NAMES = frozenset({"test"})


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("val_split", sa.Float, nullable=True))
        batch.add_column(sa.Column("split_seed", sa.Integer, nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("split_draw", sa.JSON, nullable=True))
    op.create_table(
        "dataset_images",
        sa.Column("dataset_id", sa.String(64), primary_key=True),
        sa.Column("image_id", sa.Integer, primary_key=True),
        sa.Column("file_name", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("split", sa.String(8), nullable=False),
    )
    op.create_index("ix_dataset_images_sha256", "dataset_images", ["sha256"])
    _fill_in(op.get_bind())


def downgrade() -> None:
    op.drop_index("ix_dataset_images_sha256", "dataset_images")
    op.drop_table("dataset_images")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("split_draw")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("split_seed")
        batch.drop_column("val_split")


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _fill_in(bind: sa.Connection) -> None:
    datasets = sa.table("datasets", sa.column("id"), sa.column("path"), sa.column("splits"),
                        sa.column("val_split"), sa.column("split_seed"))  # fmt: skip
    jobs = sa.table("jobs", sa.column("id"), sa.column("spec"), sa.column("split_draw", sa.JSON))
    images = sa.table("dataset_images", *(sa.column(c) for c in ("dataset_id", "image_id", "file_name", "sha256",
                                                                 "split")))  # fmt: skip
    draws: dict[str, list[tuple[str, tuple[float, int]]]] = {}  # dataset -> (job, the draw it made)
    for job_id, spec in bind.execute(sa.select(jobs.c.id, jobs.c.spec)).all():
        spec = _json(spec) or {}
        val_split = spec.get("val_split")
        draw = (DEFAULT_VAL_SPLIT if val_split is None else float(val_split), int(spec.get("seed") or 0))
        draws.setdefault(str(spec.get("dataset")), []).append((job_id, draw))
    for ds_id, path, splits in bind.execute(sa.select(datasets.c.id, datasets.c.path, datasets.c.splits)).all():
        found = _images(Path(path))
        names = {str(im.get("split", "")).lower() for im in found} if found else set(_json(splits) or {})
        if names & (VAL_NAMES | TEST_NAMES):
            roles = _own_roles(found)
        else:
            used = {draw[0] for _, draw in draws.get(ds_id, [])}
            val_split = used.pop() if len(used) == 1 else DEFAULT_VAL_SPLIT
            bind.execute(sa.update(datasets).where(datasets.c.id == ds_id).values(val_split=val_split, split_seed=0))
            val = _draw_val([im["id"] for im in found], val_split, 0)
            roles = {im["id"]: "val" if im["id"] in val else "train" for im in found}
            for job_id, draw in draws.get(ds_id, []):
                if draw != (val_split, 0):
                    bind.execute(sa.update(jobs).where(jobs.c.id == job_id).values(
                        split_draw={"val_split": draw[0], "seed": draw[1]}))  # fmt: skip
        rows = [{"dataset_id": ds_id, "image_id": im["id"], "file_name": im["file_name"], "sha256": im["sha256"],
                 "split": roles[im["id"]]} for im in found]  # fmt: skip
        if rows:
            bind.execute(sa.insert(images), rows)


def _images(root: Path) -> list[dict[str, Any]]:
    """The data set's images (id, file_name, split, sha256), or [] when its folder, annotation file or any image
    is gone (then nothing is known about its contents)."""
    try:
        coco = json.loads((root / "annotations.json").read_bytes())
        found = []
        for im in coco["images"]:
            file = next(f for f in (root / im["file_name"], root / "images" / im["file_name"]) if f.is_file())
            found.append({"id": int(im["id"]), "file_name": str(im["file_name"]), "split": im.get("split"),
                          "sha256": hashlib.sha256(file.read_bytes()).hexdigest()})  # fmt: skip
        return found
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return []


def _own_roles(found: list[dict[str, Any]]) -> dict[int, str]:
    """The images' own split: val validates and test is held out, or test validates when nothing is val."""
    named = {im["id"]: str(im.get("split", "")).lower() for im in found}
    has_val = any(s in VAL_NAMES for s in named.values())
    roles = {}
    for i, s in named.items():
        if s in VAL_NAMES:
            roles[i] = "val"
        elif s in TEST_NAMES:
            roles[i] = "test" if has_val else "val"
        else:
            roles[i] = "train"
    return roles


def _draw_val(image_ids: list[int], val_split: float, seed: int) -> set[int]:
    n_val = round(len(image_ids) * val_split)
    if val_split > 0 and len(image_ids) >= 2:
        n_val = min(max(n_val, 1), len(image_ids) - 1)
    shuffled = sorted(image_ids)
    random.Random(seed).shuffle(shuffled)
    return set(shuffled[:n_val])

"""The catalogue half of the job store: uploaded datasets and checkpoints, published models. Torch-free.

Every method returns plain JSON-ready dicts (timestamps as ISO 8601 strings in UTC). ``core.store.Store``
adds the jobs and their lease protocol on top of it; the API and the worker use that one class.

A published model's row is the one place its description lives (architecture, classes, input size,
metrics, source job, export details, sha256: ``meta``); its stored folder (``key``, ``core.artifacts``) holds only what
serving needs (``deploy.registry``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from core.db import make_engine, migrate, plain, utcnow
from core.schema import checkpoints, dataset_images, datasets, jobs, models
from core.tenants import DEFAULT_TENANT


class Catalogue:
    """``url``: ``sqlite:///path.db`` or ``postgresql://user@host/db``; the schema is migrated on start."""

    def __init__(self, url: str):
        self.url = url
        self.engine = make_engine(url)
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
        self, id: str, name: str, key: str, classes: list[str], num_images: int, num_boxes: int,
        splits: dict[str, Any], problems: list[str], tenant: str = DEFAULT_TENANT, *,
        val_split: float | None = None, split_seed: int | None = None, images: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Record a published data set, with its split: ``val_split`` and ``split_seed`` when it was drawn at
        upload (None when the images' own split decides), and ``images``, each ``{image_id, file_name, sha256,
        split}`` (``split``: train, val or test), in the same transaction."""
        values = dict(
            id=id, name=name, key=key, classes=list(classes), num_images=int(num_images),
            num_boxes=int(num_boxes), splits=dict(splits), problems=list(problems), created_at=utcnow(),
            tenant=tenant, val_split=val_split, split_seed=split_seed,
        )  # fmt: skip
        with self._tx() as conn:
            conn.execute(insert(datasets).values(**values))
            if images:
                conn.execute(insert(dataset_images), [{"dataset_id": id, **im} for im in images])
        return self._with_split(plain(values))

    def get_dataset(self, id: str) -> dict[str, Any] | None:
        with self._tx() as conn:
            row = conn.execute(select(datasets).where(datasets.c.id == id)).first()
        return None if row is None else self._with_split(plain(row._mapping))

    def list_datasets(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Newest first; only ``tenant``'s unless None."""
        q = select(datasets).order_by(datasets.c.created_at.desc(), datasets.c.id)
        if tenant is not None:
            q = q.where(datasets.c.tenant == tenant)
        with self._tx() as conn:
            rows = conn.execute(q).all()
        return [self._with_split(plain(r._mapping)) for r in rows]

    def dataset_images(self, id: str) -> list[dict[str, Any]]:
        """The data set's images, ``{image_id, file_name, sha256, split}``, by image id ([] when none are known)."""
        q = select(dataset_images).where(dataset_images.c.dataset_id == id).order_by(dataset_images.c.image_id)
        with self._tx() as conn:
            return [{k: v for k, v in r._mapping.items() if k != "dataset_id"} for r in conn.execute(q)]

    def _with_split(self, ds: dict[str, Any]) -> dict[str, Any]:
        """``ds`` with ``split``: its ``source`` ("drawn": a seeded draw of ``val_split`` by ``split_seed``; "own":
        the images' own split fields; "unknown": added without one) and the images in each part (None when its
        images are not known)."""
        q = (select(dataset_images.c.split, sa.func.count()).where(dataset_images.c.dataset_id == ds["id"])
             .group_by(dataset_images.c.split))  # fmt: skip
        with self._tx() as conn:
            counts = dict(conn.execute(q).all())
        drawn = ds.get("val_split") is not None
        ds["split"] = {
            "source": "drawn" if drawn else ("own" if counts else "unknown"),
            "val_split": ds.get("val_split"), "split_seed": ds.get("split_seed"),
            **{part: counts.get(part, 0) if counts else None for part in ("train", "val", "test")},
        }  # fmt: skip
        return ds

    # -- checkpoints ----------------------------------------------------------------------------

    def add_checkpoint(
        self, id: str, key: str, arch: dict[str, Any], name: str | None, tenant: str = DEFAULT_TENANT
    ) -> dict[str, Any]:
        values = dict(id=id, key=key, arch=dict(arch), name=name, created_at=utcnow(), tenant=tenant)
        with self._tx() as conn:
            conn.execute(insert(checkpoints).values(**values))
        return plain(values)

    def get_checkpoint(self, id: str) -> dict[str, Any] | None:
        with self._tx() as conn:
            row = conn.execute(select(checkpoints).where(checkpoints.c.id == id)).first()
        return None if row is None else plain(row._mapping)

    # -- models ---------------------------------------------------------------------------------

    def add_model(
        self, id: str, job_id: str | None, key: str, meta: dict[str, Any], tenant: str | None = None, *,
        format: str = "fp32", fp32_id: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Record a published model. Idempotent: adding the same id (or a second model of the same job and
        ``format``) returns the model already recorded. ``tenant``: by default the tenant of the job that made it
        (the default tenant without a job).

        A job publishes one fp32 model (the job's ``model_id``) and, when asked, its int8 and fp16 siblings,
        which name the fp32 model in ``fp32_id``.
        """
        if (format == "fp32") != (fp32_id is None):
            raise ValueError("an int8 or fp16 model names its fp32 sibling, and an fp32 model has none")
        if tenant is None:
            tenant = self._job_tenant(job_id) if job_id else DEFAULT_TENANT
        values = dict(id=id, job_id=job_id, key=key, meta=dict(meta), created_at=utcnow(), tenant=tenant,
                      format=format, fp32_id=fp32_id)  # fmt: skip
        try:
            with self._tx() as conn:
                conn.execute(insert(models).values(**values))
        except IntegrityError:
            existing = self.get_model(id) or (self._one_model(_of_job(job_id, format)) if job_id else None)
            if existing is None:
                raise
            return existing
        return plain(values)

    def get_model(self, id: str) -> dict[str, Any] | None:
        return self._one_model(models.c.id == id)

    def model_for_job(self, job_id: str) -> dict[str, Any] | None:
        """The job's fp32 model (its ``model_id``)."""
        return self._one_model(_of_job(job_id, "fp32"))

    def models_for_job(self, job_id: str) -> list[dict[str, Any]]:
        """Every model the job published: fp32 first, then its siblings in ``meta["variants"]`` order."""
        with self._tx() as conn:
            rows = [plain(r._mapping) for r in conn.execute(select(models).where(models.c.job_id == job_id))]
        order = ["fp32", *next((m["meta"].get("variants") or {} for m in rows if m["format"] == "fp32"), {})]
        return sorted(rows, key=lambda m: order.index(m["format"]) if m["format"] in order else len(order))

    def list_models(self, tenant: str | None = None) -> list[dict[str, Any]]:
        """Newest first; only ``tenant``'s unless None."""
        with self._tx() as conn:
            rows = conn.execute(self._models_newest_first(tenant)).all()
        return [plain(r._mapping) for r in rows]

    def newest_model(self, tenant: str | None = None) -> dict[str, Any] | None:
        """The newest fp32 model (of ``tenant`` unless None): what ``/detect`` serves by default. A job's
        int8 and fp16 siblings are published with it and served when asked for by id."""
        with self._tx() as conn:
            row = conn.execute(self._models_newest_first(tenant).where(models.c.format == "fp32").limit(1)).first()
        return None if row is None else plain(row._mapping)

    @staticmethod
    def _models_newest_first(tenant: str | None) -> sa.Select:
        q = select(models).order_by(models.c.created_at.desc(), models.c.id.desc())
        return q if tenant is None else q.where(models.c.tenant == tenant)

    def _job_tenant(self, job_id: str) -> str:
        with self._tx() as conn:
            tenant = conn.execute(select(jobs.c.tenant).where(jobs.c.id == job_id)).scalar()
        return tenant or DEFAULT_TENANT

    def _one_model(self, where: sa.ColumnElement[bool]) -> dict[str, Any] | None:
        with self._tx() as conn:
            row = conn.execute(select(models).where(where)).first()
        return None if row is None else plain(row._mapping)


def _of_job(job_id: str, format: str) -> sa.ColumnElement[bool]:
    return sa.and_(models.c.job_id == job_id, models.c.format == format)

"""Store rows as clients see them: server paths and lease bookkeeping stay inside."""

from __future__ import annotations

from typing import Any

from core.routing import queue_for

_HIDDEN_JOB_FIELDS = frozenset(
    {"lease_owner", "lease_seconds", "lease_expires_at", "heartbeat_at", "idempotency_key", "enqueued_at"}
)


def public_job(job: dict[str, Any]) -> dict[str, Any]:
    # The queue says which workers may take the job: one waits there until a worker with that many slots runs.
    return {**{k: v for k, v in job.items() if k not in _HIDDEN_JOB_FIELDS}, "queue": queue_for(job.get("spec") or {})}


def public_model(model: dict[str, Any]) -> dict[str, Any]:
    """The model row's metadata (model.json as published) flattened beside its id, job, precision and date."""
    meta = dict(model.get("meta") or {})
    meta.pop("path", None)  # rows from before storage keys (migration 0008) named a folder
    return {
        **meta,
        "id": model["id"],
        "job_id": model.get("job_id"),
        "format": model.get("format", "fp32"),
        "fp32_id": model.get("fp32_id"),
        "created_at": model.get("created_at"),
        "tenant": model.get("tenant"),
    }


def public_dataset(ds: dict[str, Any]) -> dict[str, Any]:
    # val_split and split_seed are shown inside ``split`` (core.catalogue), with the images in each part.
    return {k: v for k, v in ds.items() if k not in ("key", "val_split", "split_seed")}


def public_checkpoint(ck: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ck.items() if k != "key"}

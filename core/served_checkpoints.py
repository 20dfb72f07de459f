"""A detector checkpoint published as a model without training (issue 19, "Served as they are"). Torch-free.

``POST /v1/models`` with ``{"checkpoint": "ckpt_..."}`` makes a job of kind ``export``. Exporting needs torch,
which the API process has not, so the worker does it, in the export child it runs after every training
(``python -m worker.export``: the model's own decoding in the graph, checked against PyTorch, then
``worker.publish``). The job's run folder is prepared here as a finished training leaves it:

    runs/<job>/model.pt       the uploaded checkpoint (a hard link where the file system allows, else a copy)
    runs/<job>/metrics.json   {} (nothing was trained)
    runs/<job>/spec.json      {"kind": "export", "export": {"formats": [...]}} (no data set: no AP measured)

so the worker's attempt (``worker.jobs``) finds a trained model and goes straight to export and publishing; the
model is ``mdl_<the job's hex>`` as for any job, and cancelling, retrying and the job's history work as theirs.
Preparing the folder before the broker message is sent keeps the worker from ever seeing the job without it
(the recovery loop re-sends only jobs queued for longer than a lease).
"""

from __future__ import annotations

import os
import shutil
from typing import Any

from core.artifacts import artifacts_for
from core.settings import Settings
from core.store import Store
from distill.files import atomic_write_json

EXPORT_KIND = "export"


def export_spec(checkpoint_id: str, name: str | None, formats: list[str]) -> dict[str, Any]:
    """The stored spec of an export job (what ``GET /v1/jobs/{id}`` shows; it names the checkpoint, so the
    checkpoint cannot be deleted while the job is queued or running)."""
    return {"kind": EXPORT_KIND, "checkpoint": checkpoint_id, "name": name, "export": {"formats": formats}}


def create_export_job(
    store: Store,
    settings: Settings,
    checkpoint: dict[str, Any],
    *,
    name: str | None,
    formats: list[str],
    tenant: str,
    idempotency_key: str | None = None,
) -> tuple[dict[str, Any], bool]:
    """A queued export job for ``checkpoint`` (a store row) with its run folder prepared (module docstring), or
    (same key and spec) the job made before and ``False``; the store's ``create_job`` errors pass through."""
    spec = export_spec(checkpoint["id"], name, formats)
    job, created = store.create_job(
        spec, idempotency_key=idempotency_key, tenant=tenant, max_active=settings.max_active_jobs
    )
    if created:
        artifacts = artifacts_for(settings)
        run_dir = settings.run_dir(job["id"])
        run_dir.mkdir(parents=True, exist_ok=True)
        source = artifacts.file(checkpoint["key"])
        try:
            os.link(source, run_dir / "model.pt")  # no second copy of a large file
        except OSError:
            shutil.copyfile(source, run_dir / "model.pt")
        atomic_write_json(run_dir / "spec.json", {"kind": EXPORT_KIND, "name": name, "export": {"formats": formats}})
        atomic_write_json(run_dir / "metrics.json", {})  # last: with it the folder reads as a finished training
        artifacts.push_run(job["id"])  # with object storage: for the worker that takes it, metrics.json last
    return job, created

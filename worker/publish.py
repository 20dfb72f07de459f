"""Publishing an exported model: its files into the registry, its description into the store. Torch-free.

The two places hold different things (DESIGN section 1, "one place for each thing"):

- the registry folder ``models/<id>/`` holds what the runtime needs to serve it: ``model.onnx`` and the
  small ``model.json`` that ``deploy.runtime.Predictor`` reads (classes, input size, mean/std, sha256);
- the store's model row is the catalogue: everything else that describes the model (architecture,
  metrics, source job, name, export and verification details, graph statistics), which the API shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy.registry import Registry
from worker.store import Store


def publish_model(
    store: Store, registry: Registry, export_dir: Path, description: dict[str, Any], *, model_id: str,
    job_id: str | None, **fields: Any,
) -> dict[str, Any]:
    """Publish ``export_dir`` (``model.onnx`` + ``model.json`` from ``deploy.export``) as ``model_id`` and
    record it in the store; returns the store's model row.

    ``description`` is what ``deploy.export.export_model`` returned; ``fields`` (name, kind, metrics, ...)
    are added to it in the catalogue. Idempotent, so an attempt that died between the two steps is finished
    by the next one: a model already published under ``model_id`` is recorded as it is, and the store keeps
    one model per job.
    """
    try:
        published = registry.get(model_id)  # an earlier attempt published, then died
    except KeyError:
        try:
            published = registry.publish(export_dir, model_id=model_id)
        except FileExistsError:  # a racing publisher won; its model is the job's model
            published = registry.get(model_id)
    meta = {**description, **fields, **published}
    return store.add_model(model_id, job_id, str(registry.path(model_id)), meta)

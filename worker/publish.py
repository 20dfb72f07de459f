"""Publishing an exported model: its files into the registry, its description into the store. Torch-free.

The two places hold different things (DESIGN section 1, "one place for each thing"):

- the registry folder ``models/<id>/`` holds what the runtime needs to serve it: ``model.onnx`` and the
  small ``model.json`` that ``deploy.runtime.Predictor`` reads (classes, input size, mean/std, sha256);
- the store's model row is the catalogue: everything else that describes the model (architecture,
  format, metrics measured by the runtime that serves it, source job, name, export and verification
  details, graph statistics, ``accuracy_warning``), which the API shows.

A job publishes one model per export format: fp32 under its model id, int8 and fp16 beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.artifacts import Artifacts, model_key
from core.store import Store
from deploy.registry import Registry, read_model_json


def publish_model(
    store: Store,
    artifacts: Artifacts,
    export_dir: Path,
    description: dict[str, Any],
    *,
    model_id: str,
    job_id: str | None,
    **fields: Any,
) -> dict[str, Any]:
    """Publish ``export_dir`` (from ``deploy.export``: fp32 in it, each other format in ``<format>/``) as
    ``model_id`` (fp32) and ``<model_id><format>`` (e.g. ``mdl_5e6f...int8``), and record each in the
    store, each linked to the job and, for int8 and fp16, to the fp32 sibling; returns the fp32 model's row.

    ``description`` is what ``deploy.export.export_model`` returned (its ``variants`` describe the other
    formats); ``fields`` (name, kind, training_metrics, ...) are added to every model in the catalogue.
    Idempotent, so an attempt that died between steps is finished by the next one: a model already published
    under an id is recorded as it is, the store keeps one model per job and format, and the fp32 row (which
    says the job is published) is written last.
    """
    registry = Registry(artifacts.staging("models"))
    variants = dict(description.get("variants") or {})
    ids = {fmt: f"{model_id}{fmt}" for fmt in variants}
    for fmt, variant in variants.items():
        variant = {k: v for k, v in variant.items() if k != "dir"}
        _publish_one(
            store, artifacts, registry, export_dir / fmt, {**variant, **fields}, ids[fmt], job_id, fmt, model_id
        )
    meta = {k: v for k, v in description.items() if k != "variants"}
    # Last: the job's fp32 model is what says the job is published.
    return _publish_one(
        store, artifacts, registry, export_dir, {**meta, **fields, "variants": ids}, model_id, job_id, "fp32", None
    )


def _publish_one(
    store: Store, artifacts: Artifacts, registry: Registry, folder: Path, meta: dict[str, Any], model_id: str,
    job_id: str | None, fmt: str, fp32_id: str | None,
) -> dict[str, Any]:  # fmt: skip
    key = model_key(model_id)
    if artifacts.remote and artifacts.exists(key):  # stored by an earlier attempt (maybe on another machine)
        published = read_model_json(artifacts.tree(key))
    else:
        try:
            published = registry.get(model_id)  # an earlier attempt published, then died
        except KeyError:
            try:
                published = registry.publish(folder, model_id=model_id)
            except FileExistsError:  # a racing publisher won; its model is the job's model
                published = registry.get(model_id)
        artifacts.publish_tree(key)  # with object storage: its files, then its manifest (readers see it whole)
    # model.json's "format" is its schema tag; the catalogue's precision is the row's own column.
    meta = {k: v for k, v in {**meta, **published}.items() if k != "format"}
    return store.add_model(model_id, job_id, key, meta, format=fmt, fp32_id=fp32_id)

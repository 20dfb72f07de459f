"""``/v1/datasets``: upload a zip (COCO JSON or Pascal VOC XML, with images), list, describe.

The zip is unpacked and checked in a private upload folder (``api.datasets``); only a dataset that passed
every check is moved under ``datasets/<id>/`` and recorded in the store.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool

from api import schemas
from api.datasets import UploadError, ZipLimits, import_dataset, publish_dataset
from api.deps import ResourceId, SettingsDep, StoreDep, get_or_404
from api.errors import APIError, error_docs
from api.presenters import public_dataset
from api.uploads import save_upload, upload_folder
from worker.store import new_id

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.post(
    "",
    status_code=201,
    response_model=schemas.Dataset,
    summary="Upload a dataset (zip: COCO JSON + images, or Pascal VOC XML + images)",
    responses=error_docs(400, 413, 422),
)
async def upload_dataset(
    file: Annotated[UploadFile, File(description="a .zip with one COCO JSON file or VOC XML files, and images")],
    settings: SettingsDep,
    store: StoreDep,
    name: Annotated[str | None, Form(max_length=200, description="a name for humans")] = None,
) -> dict[str, Any]:
    async with upload_folder(settings.data_dir) as work:
        archive = work / "upload.zip"
        await save_upload(file, archive)
        # The unpacked size may exceed the upload's (images compress little, JSON a lot), within reason.
        limits = ZipLimits(max_total_bytes=max(4 * settings.max_upload_bytes, 64 << 20))
        try:
            imported = await run_in_threadpool(import_dataset, archive, work, limits, settings.max_image_pixels)
        except UploadError as e:
            raise APIError(e.status, e.code, e.message, e.details) from e
        dataset_id = new_id("ds")
        final = await run_in_threadpool(publish_dataset, imported, settings.datasets_dir, dataset_id)
        ds_name = name or Path(file.filename or "dataset").stem or "dataset"
        try:
            row = await run_in_threadpool(
                store.add_dataset, dataset_id, ds_name, str(final), imported.classes,
                imported.num_images, imported.num_boxes, imported.splits, imported.problems,
            )  # fmt: skip
        except Exception:
            shutil.rmtree(final, ignore_errors=True)  # no folder without its row
            raise
        return {**public_dataset(row), "format": imported.format}


@router.get("", response_model=schemas.DatasetList, summary="List datasets")
def list_datasets(store: StoreDep) -> dict[str, Any]:
    return {"datasets": [public_dataset(d) for d in store.list_datasets()]}


@router.get("/{dataset_id}", response_model=schemas.Dataset, summary="Describe a dataset",
            responses=error_docs(404))  # fmt: skip
def get_dataset(dataset_id: ResourceId, store: StoreDep) -> dict[str, Any]:
    return public_dataset(get_or_404(store.get_dataset, "dataset", dataset_id))

"""``/v1/datasets``: upload a zip (COCO JSON or Pascal VOC XML, with images), list, describe.

The zip is unpacked and checked in a private upload folder (``api.datasets``); only a dataset that passed
every check is moved under ``datasets/<id>/`` and recorded in the store.
"""

from __future__ import annotations

import errno
import io
import shutil
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool

from api import schemas
from api.datasets import UploadError, ZipLimits, import_dataset, publish_dataset
from api.deps import IN_USE, ArtifactsDep, CallerDep, ResourceId, SettingsDep, StoreDep, delete_or_409, get_or_404
from api.errors import APIError, error_docs
from api.presenters import public_dataset
from api.uploads import ensure_room, save_upload, upload_folder, upload_size
from core import deletion
from core.artifacts import dataset_key
from core.db import new_id
from deploy.draw import draw_detections
from distill.data.annotations import CocoData, load_coco

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
SPLIT_DOC = (
    "for a data set whose images name no validation or test split: the share of images drawn for validation, "
    "once, here; the split is stored and every job and study on the data set uses it (a job's seed never moves "
    "an image between train and validation)"
)


@router.post(
    "",
    status_code=201,
    response_model=schemas.Dataset,
    summary="Upload a dataset (zip: COCO JSON + images, or Pascal VOC XML + images)",
    responses=error_docs(400, 413, 422, 507),
)
async def upload_dataset(
    file: Annotated[UploadFile, File(description="a .zip with one COCO JSON file or VOC XML files, and images")],
    settings: SettingsDep,
    store: StoreDep,
    artifacts: ArtifactsDep,
    caller: CallerDep,
    name: Annotated[str | None, Form(max_length=200, description="a name for humans")] = None,
    val_split: Annotated[float, Form(ge=0, lt=1, description=SPLIT_DOC)] = 0.2,
    split_seed: Annotated[int, Form(ge=0, le=2**31 - 1, description="the seed of that draw")] = 0,
) -> dict[str, Any]:
    # Room for the archive and what it unpacks to, checked before either is written.
    ensure_room(settings.data_dir, upload_size(file), settings.min_free_bytes)
    async with upload_folder(settings.data_dir) as work:
        archive = work / "upload.zip"
        await save_upload(file, archive)
        ensure_room(settings.data_dir, _unpacked_size(archive), settings.min_free_bytes)
        # The unpacked size may exceed the upload's (images compress little, JSON a lot), within reason.
        limits = ZipLimits(max_total_bytes=max(4 * settings.max_upload_bytes, 64 << 20))
        try:
            imported = await run_in_threadpool(
                import_dataset,
                archive,
                work,
                limits,
                settings.max_image_pixels,
                val_split,
                split_seed,
                settings.max_bad_image_fraction,
            )
        except UploadError as e:
            if isinstance(e.__cause__, OSError) and e.__cause__.errno == errno.ENOSPC:
                raise e.__cause__ from e  # the disk filled while unpacking: upload_folder answers 507
            raise APIError(e.status, e.code, e.message, e.details) from e
        dataset_id = new_id("ds")
        key = dataset_key(dataset_id)
        final = await run_in_threadpool(publish_dataset, imported, artifacts.staging(key).parent, dataset_id)
        ds_name = name or Path(file.filename or "dataset").stem or "dataset"
        try:
            await run_in_threadpool(artifacts.publish_tree, key)  # with object storage: uploaded, manifest last
            row = await run_in_threadpool(
                store.add_dataset, dataset_id, ds_name, key, imported.classes,
                imported.num_images, imported.num_boxes, imported.splits, imported.problems, caller.tenant,
                val_split=imported.val_split, split_seed=imported.split_seed, images=imported.images,
            )  # fmt: skip
        except Exception:
            await run_in_threadpool(artifacts.delete, key)  # no folder without its row
            shutil.rmtree(final, ignore_errors=True)
            raise
        return {**public_dataset(row), "format": imported.format}


@router.get("", response_model=schemas.DatasetList, summary="List datasets (the caller's tenant's)")
def list_datasets(store: StoreDep, caller: CallerDep) -> dict[str, Any]:
    return {"datasets": [public_dataset(d) for d in store.list_datasets(tenant=caller.scope)]}


@router.get("/{dataset_id}", response_model=schemas.Dataset, summary="Describe a dataset",
            responses=error_docs(404))  # fmt: skip
def get_dataset(dataset_id: ResourceId, store: StoreDep, caller: CallerDep) -> dict[str, Any]:
    return public_dataset(get_or_404(store.get_dataset, "dataset", dataset_id, caller.scope))


def _unpacked_size(archive: Path) -> int:
    """What the zip declares it unpacks to (0 for a file that is no zip: the import refuses it with the reason)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            return sum(i.file_size for i in zf.infolist())
    except (zipfile.BadZipFile, OSError):
        return 0


@router.get(
    "/{dataset_id}/samples/{index}",
    summary="One image of the dataset with its ground-truth boxes drawn (JPEG)",
    description=(
        "Image `index` (0 to `num_images` - 1, in the dataset's order) with its boxes and class names drawn by "
        "the project's one drawing function (`deploy.draw`; ground truth shows its class name without a score), "
        "scaled to fit `max_side` pixels."
    ),
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, **error_docs(404)},
)
def dataset_sample(
    dataset_id: ResourceId,
    index: Annotated[int, PathParam(ge=0, le=10_000_000)],
    store: StoreDep,
    artifacts: ArtifactsDep,
    caller: CallerDep,
    max_side: Annotated[int, Query(ge=32, le=2048, description="longest side of the picture, pixels")] = 480,
) -> Response:
    row = get_or_404(store.get_dataset, "dataset", dataset_id, caller.scope)
    data = published_annotations(artifacts.tree(row["key"]))
    if index >= len(data.images):
        raise APIError(404, "not_found", f"dataset {dataset_id!r} has {len(data.images)} images; no image {index}")
    image = data.images[index]
    boxes, labels = data.boxes(image["id"])
    ground_truth = [{"box": box.tolist(), "score": None, "label": int(label), "class_name": data.classes[label]}
                    for box, label in zip(boxes, labels, strict=True)]  # fmt: skip
    picture = draw_detections(image["path"], ground_truth)
    picture.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    picture.save(buf, "JPEG", quality=85)
    # A dataset never changes once published: the browser may keep the picture.
    return Response(buf.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@lru_cache(maxsize=4)
def published_annotations(path: str | Path) -> CocoData:
    """The published dataset's annotations (checked at upload, so the images are not opened again)."""
    return load_coco(path, check_images=False)


@router.delete("/{dataset_id}", status_code=204, response_class=Response, responses={**error_docs(404), **IN_USE},
               summary="Delete a dataset and its files (409 while a queued or running job uses it)")  # fmt: skip
def delete_dataset(dataset_id: ResourceId, store: StoreDep, settings: SettingsDep, caller: CallerDep) -> Response:
    get_or_404(store.get_dataset, "dataset", dataset_id, caller.scope)
    return delete_or_409(deletion.delete_dataset, store, settings, dataset_id, caller.tenant)

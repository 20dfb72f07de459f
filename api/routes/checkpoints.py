"""``/v1/checkpoints``: upload a GFL detector checkpoint (ours or mmdetection's) or a ResNet backbone, and
describe it.

The file is read without running any of its code (``distill.ckpt_reader``, the reader training and export
use too); its inferred architecture is stored, so that a job naming it as teacher or as the student's
initial weights is checked before it is queued.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Response, UploadFile
from fastapi.concurrency import run_in_threadpool

from api import schemas
from api.deps import IN_USE, ArtifactsDep, CallerDep, ResourceId, SettingsDep, StoreDep, delete_or_409, get_or_404
from api.errors import APIError, error_docs
from api.presenters import public_checkpoint
from api.uploads import ensure_room, save_upload, upload_folder, upload_size
from core import deletion
from core.artifacts import checkpoint_key
from core.db import new_id
from distill.ckpt_layout import describe_checkpoint
from distill.ckpt_reader import CheckpointError

router = APIRouter(prefix="/v1/checkpoints", tags=["checkpoints"])


@router.post(
    "",
    status_code=201,
    response_model=schemas.Checkpoint,
    summary="Upload a detector checkpoint (ours or mmdetection's GFL) or a ResNet backbone; read without "
    "unpickling code",
    responses=error_docs(400, 413, 422, 507),
)
async def upload_checkpoint(
    file: Annotated[UploadFile, File(description="a .pt/.pth file written by torch.save")],
    settings: SettingsDep,
    store: StoreDep,
    artifacts: ArtifactsDep,
    caller: CallerDep,
    name: Annotated[str | None, Form(max_length=200)] = None,
) -> dict[str, Any]:
    ensure_room(settings.data_dir, upload_size(file), settings.min_free_bytes)
    async with upload_folder(settings.data_dir) as work:
        tmp = work / "checkpoint.pt"
        await save_upload(file, tmp)
        try:
            arch = await run_in_threadpool(describe_checkpoint, tmp)
        except CheckpointError as e:
            raise APIError(422, "invalid_checkpoint", str(e)) from e
        ckpt_id = new_id("ckpt")
        key = checkpoint_key(ckpt_id)
        final = artifacts.staging(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, final)  # the upload folder is under the same data_dir: one atomic rename
        try:
            await run_in_threadpool(artifacts.publish_file, key)  # with object storage: uploaded whole
            row = await run_in_threadpool(
                store.add_checkpoint, ckpt_id, key, arch, name or file.filename, caller.tenant
            )
        except Exception:
            await run_in_threadpool(artifacts.delete, key)  # no file without its row
            raise
        return public_checkpoint(row)


@router.get("/{checkpoint_id}", response_model=schemas.Checkpoint, summary="Describe an uploaded checkpoint",
            responses=error_docs(404))  # fmt: skip
def get_checkpoint(checkpoint_id: ResourceId, store: StoreDep, caller: CallerDep) -> dict[str, Any]:
    return public_checkpoint(get_or_404(store.get_checkpoint, "checkpoint", checkpoint_id, caller.scope))


@router.delete("/{checkpoint_id}", status_code=204, response_class=Response, responses={**error_docs(404), **IN_USE},
               summary="Delete an uploaded checkpoint (409 while a queued or running job uses it)")  # fmt: skip
def delete_checkpoint(checkpoint_id: ResourceId, store: StoreDep, settings: SettingsDep, caller: CallerDep) -> Response:
    get_or_404(store.get_checkpoint, "checkpoint", checkpoint_id, caller.scope)
    return delete_or_409(deletion.delete_checkpoint, store, settings, checkpoint_id, caller.tenant)

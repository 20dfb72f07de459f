"""Where uploads land before they are checked: one private folder per request under ``<data_dir>/tmp``.

A folder is removed when its request ends, whatever happened; what a crashed API left behind is removed
at the next start (:func:`remove_stale_uploads`). The form parser has already spooled the upload, so
:func:`save_upload` copies it in chunks without holding it in memory.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import UploadFile
from fastapi.concurrency import run_in_threadpool

UPLOAD_CHUNK = 1 << 20


def uploads_dir(data_dir: Path) -> Path:
    return data_dir / "tmp"


@asynccontextmanager
async def upload_folder(data_dir: Path) -> AsyncIterator[Path]:
    """A fresh folder for one request's upload, removed (with all it holds) when the request ends."""
    root = uploads_dir(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="upload-", dir=root))
    try:
        yield work
    finally:
        await run_in_threadpool(shutil.rmtree, work, True)


async def save_upload(upload: UploadFile, dest: Path) -> int:
    """Copy an upload to ``dest`` in chunks; returns its size."""
    size = 0
    with open(dest, "wb") as out:
        while chunk := await upload.read(UPLOAD_CHUNK):
            size += len(chunk)
            await run_in_threadpool(out.write, chunk)
    return size


def remove_stale_uploads(data_dir: Path, older_than_s: float = 3600.0) -> None:
    """Delete upload folders left by a crashed API. Only old ones: another API process sharing the data
    folder may be receiving an upload right now."""
    root = uploads_dir(data_dir)
    if not root.is_dir():
        return
    now = time.time()
    for entry in root.iterdir():
        try:
            if now - entry.stat().st_mtime > older_than_s:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass

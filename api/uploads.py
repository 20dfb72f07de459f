"""Where uploads land before they are checked: one private folder per request under ``<data_dir>/tmp``.

A folder is removed when its request ends, whatever happened; what a crashed API left behind is removed
at the next start (:func:`remove_stale_uploads`). The form parser has already spooled the upload, so
:func:`save_upload` copies it in chunks without holding it in memory.

Room: before anything is written to the data folder, :func:`ensure_room` checks that the write leaves at least
``LDD_MIN_FREE_BYTES`` free there (507 otherwise), and a disk that fills up anyway (another writer was
quicker) answers 507 too (:func:`upload_folder`); either way the request's folder is removed, so no partial
file is left.
"""

from __future__ import annotations

import errno
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import UploadFile
from fastapi.concurrency import run_in_threadpool

from api.errors import APIError
from distill import files

UPLOAD_CHUNK = 1 << 20


def uploads_dir(data_dir: Path) -> Path:
    return data_dir / "tmp"


@asynccontextmanager
async def upload_folder(data_dir: Path) -> AsyncIterator[Path]:
    """A fresh folder for one request's upload, removed (with all it holds) when the request ends."""
    root = uploads_dir(data_dir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        work = Path(tempfile.mkdtemp(prefix="upload-", dir=root))
    except OSError as e:
        if e.errno in _FULL:
            raise _full(e, data_dir) from e
        raise
    try:
        yield work
    except OSError as e:
        if e.errno in _FULL:
            raise _full(e, data_dir) from e
        raise
    finally:
        await run_in_threadpool(shutil.rmtree, work, True)


_FULL = (errno.ENOSPC, errno.EDQUOT)


def free_bytes(data_dir: Path) -> int:
    """Bytes free for this process in the file system of ``data_dir``."""
    return shutil.disk_usage(data_dir).free


def ensure_room(data_dir: Path, need: int, min_free: int) -> None:
    """Raise a 507 if writing ``need`` more bytes would leave less than ``min_free`` free in ``data_dir``."""
    try:
        files.ensure_room(data_dir, min_free, "an upload", need)
    except files.NoRoom as e:
        raise APIError(
            507, "insufficient_storage",
            f"not enough free space in the data folder: {e.free} bytes free, this upload needs {need} and "
            f"{min_free} must stay free (LDD_MIN_FREE_BYTES); nothing was stored",
            {"free_bytes": e.free, "needed_bytes": need, "min_free_bytes": min_free},
        ) from e  # fmt: skip


def _full(e: OSError, data_dir: Path) -> APIError:
    return APIError(507, "insufficient_storage", f"the data folder filled up while storing the upload ({e.strerror}); "
                    "nothing was stored", {"free_bytes": free_bytes(data_dir)})  # fmt: skip


def upload_size(upload: UploadFile) -> int:
    """The size of an upload the form parser has spooled (``UploadFile.size``, else by seeking its file)."""
    if upload.size is not None:
        return upload.size
    f = upload.file
    here = f.tell()
    f.seek(0, 2)
    size = f.tell()
    f.seek(here)
    return size


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

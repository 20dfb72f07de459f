"""Atomic file writes: the one helper every room uses (torch-free).

A reader (the API, a resumed run, the registry) must never see half a file, and a crash must never
leave one where a whole one used to be. So every write goes to a temporary file in the same folder,
is flushed to disk, and is renamed over the target (``os.replace`` is atomic on POSIX).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


class NoRoom(OSError):
    """Less free space than the run may use (a job's ``min_free_bytes``); nothing was written."""

    def __init__(self, folder: Path, free: int, need: int, min_free: int, what: str):
        super().__init__(
            errno.ENOSPC,
            f"No space left on device for {what}: {folder} has {free} bytes free, "
            f"{need} are needed and at least {min_free} must stay free",
        )
        self.free, self.need, self.min_free = free, need, min_free


def ensure_room(folder: str | os.PathLike[str], min_free_bytes: int, what: str, need: int = 0) -> None:
    """Raise :class:`NoRoom` when writing ``need`` bytes would leave less than ``min_free_bytes`` free in
    ``folder``'s file system. Checked before a write (uploads, checkpoints, exports), so a full disk stops the
    work with the last good file intact rather than half a new one. The one room check of every room."""
    if min_free_bytes <= 0 and need <= 0:
        return
    folder = Path(folder)
    probe = folder if folder.exists() else folder.parent
    free = shutil.disk_usage(probe).free
    if free - need < min_free_bytes:
        raise NoRoom(folder, free, need, min_free_bytes, what)


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(f)`` on a temporary binary file beside ``path``, then rename it to ``path``.

    The folder is created when missing; on any error the temporary file is removed and ``path`` is
    left as it was. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 1) -> Path:
    separators = None if indent is not None else (",", ":")
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, separators=separators))


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes, read in chunks (a checkpoint may not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()

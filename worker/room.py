"""Room on the worker's disk: a child that writes (checkpoints, exports) is not started below
``LDD_MIN_FREE_BYTES``, and a child that ran out of room fails its job with what to do, not a retry."""

from __future__ import annotations

import shutil
from pathlib import Path

from core.checks import JobRefused
from core.settings import Settings
from distill.files import NoRoom, ensure_room


def out_of_room(*texts: str) -> bool:
    return any("No space left on device" in t or "[Errno 28]" in t for t in texts)


def no_room(settings: Settings, what: str) -> str:
    free = shutil.disk_usage(settings.data_dir).free
    return (f"{what}: the data folder {settings.data_dir} has {free} bytes free (LDD_MIN_FREE_BYTES="
            f"{settings.min_free_bytes}); free some space, then submit the job again.")  # fmt: skip


def check_room(settings: Settings, what: str) -> None:
    """Refuse to start a child that writes (checkpoints, exports) when the data folder is below its minimum."""
    try:
        ensure_room(settings.data_dir, settings.min_free_bytes, what)
    except NoRoom as e:
        raise JobRefused(no_room(settings, f"not enough room to start {what}"), "no_room") from e


def tail(path: Path, n: int) -> str:
    """The last ``n`` non-empty lines of a log, on one line (at most 600 characters)."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[-600:]

"""Child processes of a job: tying them to the worker's life, and stopping them (no Celery in here).

The training and export children run in their own process group, so that one signal reaches the child
and anything it started (DataLoader workers), and they die with the pool process that runs the job.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1
POLL_SECONDS = 0.1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (a ``preexec_fn`` for the children).

    The parent is the Celery pool process that runs the job, which Celery itself makes die with the
    worker's main process: a SIGKILLed worker leaves no orphan training on in the background, writing
    into the run folder the next attempt resumes from.
    """
    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:  # not Linux: the lease still fences the job, the orphan just wastes time
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def stop_group(proc: subprocess.Popen[bytes], grace: float, keep_lease: Callable[[], None]) -> None:
    """SIGTERM the child's process group (it checkpoints and exits), SIGKILL it after ``grace`` seconds.

    ``keep_lease`` runs every poll meanwhile: the lease must outlive the grace period, or the recovery
    loop would take the job while its child is still running.
    """
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            keep_lease()
        except Exception:  # the store may be down; the SIGKILL below still comes on time
            pass
        time.sleep(POLL_SECONDS)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also any DataLoader workers left in the group
    except ProcessLookupError:
        pass
    proc.wait()

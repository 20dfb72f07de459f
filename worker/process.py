"""Child processes of a job: tying them to the worker's life, and stopping them (no Celery in here).

The training and export children run in their own process group, so that one signal reaches the child
and anything it started (DataLoader workers), and they die with the pool process that runs the job
(``die_with_parent``, a ``preexec_fn``: the pool process is their parent).

A job on several GPUs runs ``torchrun`` as its training child. ``torchrun`` starts each rank in a session of
its own, so the group signal reaches the agent only: on SIGTERM the agent passes SIGTERM to every rank (they
agree to stop, rank 0 checkpoints) and SIGKILLs them after its own grace; on SIGKILL (``stop_group``'s
second signal) the agent dies and each rank, bound to it by ``die_with_parent`` in ``distill.ddp.setup``,
dies with it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable

from distill.lifetime import die_with_parent

__all__ = ["die_with_parent", "stop_group"]

POLL_SECONDS = 0.1


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

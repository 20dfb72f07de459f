"""A process that must not outlive its parent (torch-free: the worker imports it without torch).

Used twice: the worker's training/export children die with the Celery pool process that runs the job
(``worker.process``), and each ``torchrun`` rank dies with its ``torchrun`` agent (``distill.ddp.setup``).
``torchrun`` starts every rank in a session of its own, so a SIGKILL to the agent's process group does not
reach the ranks: without this they would train on as orphans, writing into a run folder that the job's
next attempt resumes from.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (also a ``preexec_fn`` for children).

    The death signal follows the parent *thread* that started this process; the worker and ``torchrun``
    both start their children from their main thread.
    """
    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:  # not Linux: the job's lease still fences it, the orphan just wastes time
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)

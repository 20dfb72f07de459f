"""Hooks on a Celery worker's own lifecycle (they fire only in a worker process; it imports this module
through the app's ``include``, see ``worker.celery_app``).

- ready: start the recovery loop (``worker.recovery``) in a thread of the main process;
- warm shutdown (SIGTERM to the main process, e.g. ``docker stop``): Celery would wait for the running
  job to finish, however long it trains. The SIGTERM is passed on to the pool process instead: the job
  it runs checkpoints its training child and goes back to the queue (``worker.jobs``).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from celery import signals

from worker.celery_app import current_settings
from worker.recovery import start_recovery_loop


@signals.worker_shutting_down.connect(weak=False)
def forward_warm_shutdown(how: str = "", **_: Any) -> None:
    """SIGTERM every direct child of this process (the pool process) on a warm shutdown."""
    if how != "Warm":
        return
    me = str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # a direct child: a pool process
            try:
                os.kill(int(stat.parent.name), signal.SIGTERM)
            except ProcessLookupError:
                pass


@signals.worker_ready.connect(weak=False)
def start_recovery(**_: Any) -> None:
    start_recovery_loop(current_settings())

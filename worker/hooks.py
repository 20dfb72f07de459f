"""Hooks on a Celery worker's own lifecycle (they fire only in a worker process; it imports this module
through the app's ``include``, see ``core.celery_app``).

- ready: start the recovery loop (``worker.recovery``) in a thread of the main process;
- warm shutdown (SIGTERM to the main process, e.g. ``docker stop``): Celery would wait for the running
  job to finish, however long it trains. The SIGTERM is passed on to the pool process instead: the job
  it runs checkpoints its training child and goes back to the queue (``worker.jobs``);
- ready: start the consumer watchdog. After a broker outage, Celery's Redis consumer sometimes stays
  connected but never takes another message (measured by bench/chaos.py in 3 of 4 Redis restarts timed
  at a job's end; upstream celery#9054, #8030, #10302, unfixed). A worker that holds no job while
  messages wait in its queues for ``consumer_stall_seconds`` is stuck that way: it shuts down warm (it is
  idle, so nothing is lost) and ``worker.main`` starts it again in the same process (``RESTART``). Its
  queues are those it consumes: a job too big for it (another size's queue) is no reason to restart.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from celery import signals
from celery.worker import state as worker_state

from core.celery_app import current_settings
from core.queue import queue_depth
from core.settings import Settings
from worker.recovery import start_recovery_loop

log = logging.getLogger("ldd.worker")

RESTART = threading.Event()  # set when the watchdog stops a stuck consumer; worker.main starts it again


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


def consumer_stalled(
    busy: bool, waiting: int | None, stalled_since: float | None, now: float, limit_s: float
) -> tuple[float | None, bool]:
    """One look of the watchdog: ``(stalled_since, stuck)``. Stalled means idle (``busy`` False) while the
    broker holds messages (``waiting`` > 0; None: broker unreachable, which says nothing); stuck means
    stalled for ``limit_s`` without a break."""
    if busy or not waiting:
        return None, False
    since = now if stalled_since is None else stalled_since
    return since, now - since >= limit_s


def start_consumer_watchdog(settings: Settings, queues: Collection[str]) -> threading.Thread | None:
    """Watch this worker's consumer on ``queues`` (the queues it takes)."""
    if settings.consumer_stall_seconds <= 0:
        return None
    period = min(5.0, settings.consumer_stall_seconds / 3)

    def watch() -> None:
        since: float | None = None
        while not RESTART.is_set():
            time.sleep(period)
            busy = bool(worker_state.active_requests or worker_state.reserved_requests)
            since, stuck = consumer_stalled(
                busy,
                None if busy else queue_depth(settings, queues),
                since,
                time.monotonic(),
                settings.consumer_stall_seconds,
            )
            if stuck:
                log.error(
                    "this worker has taken no message for %.0f s while messages wait in its queues (a "
                    "consumer stuck after a broker outage, celery#9054): restarting it",
                    settings.consumer_stall_seconds,
                )
                RESTART.set()
                os.kill(os.getpid(), signal.SIGTERM)  # a warm shutdown; worker.main starts the worker again

    thread = threading.Thread(target=watch, name="ldd-consumer-watchdog", daemon=True)
    thread.start()
    return thread


@signals.worker_ready.connect(weak=False)
def start_watchdog(sender: Any = None, **_: Any) -> None:
    # The sender is the worker's consumer; its app consumes the queues of ``--queues`` (worker.main).
    start_consumer_watchdog(current_settings(), list(sender.app.amqp.queues.consume_from))

"""Sending jobs to the workers, and looking at the broker (torch-free; used by the API).

``enqueue`` is best effort by design: the job row already exists in the store, and the recovery loop
re-sends a message for any queued job whose message is missing, so a broker that is down when a job
is submitted delays the job instead of losing it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from core.celery_app import TASK_RUN_JOB, get_app
from core.routing import QUEUE, queue_for
from core.settings import Settings

log = logging.getLogger("ldd.queue")


def enqueue(job_id: str, settings: Settings | None = None, *, spec: Mapping[str, Any] | None = None) -> bool:
    """Send the ``run_job`` message for ``job_id`` to its queue (``core.routing.queue_for(spec)``). False if
    the broker refused.

    Without ``spec`` the message goes to queue ``gpu``, as every message did before jobs were routed by size; a
    worker that takes a job it cannot run sends it on to the right queue (``worker.tasks``), at the cost of a hop.
    """
    queue = queue_for(spec or {})
    try:
        get_app(settings).send_task(TASK_RUN_JOB, args=[job_id], queue=queue, routing_key=queue)
        return True
    except Exception as e:  # kombu raises many kinds for an unreachable broker
        log.warning("could not send job %s to the broker (the recovery loop will retry): %s", job_id, e)
        return False


def queue_depths(queues: Iterable[str], settings: Settings | None = None) -> dict[str, int] | None:
    """Messages waiting in each of ``queues`` (not those a worker holds); None if the broker is unreachable."""
    try:
        with get_app(settings).connection_for_read() as conn:
            _connect(conn)
            depths = {}
            for queue in queues:
                try:
                    _, count, _ = conn.default_channel.queue_declare(queue=queue, passive=True)
                except conn.channel_errors:
                    count = 0  # nobody declared the queue yet: it is empty
                depths[queue] = int(count)
            return depths
    except Exception:
        return None


def queue_depth(settings: Settings | None = None, queues: Iterable[str] = (QUEUE,)) -> int | None:
    """Messages waiting in ``queues`` together (default: ``gpu``, one-process jobs); None if the broker is
    unreachable."""
    depths = queue_depths(queues, settings)
    return None if depths is None else sum(depths.values())


def broker_ok(settings: Settings | None = None) -> bool:
    """True when the broker accepts a connection (readiness)."""
    try:
        with get_app(settings).connection_for_write() as conn:
            _connect(conn)
        return True
    except Exception:
        return False


def _connect(conn: Any) -> None:
    # One quick try: these are probes (readiness, metrics, recovery), not work that must get through.
    conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, interval_max=0.2, timeout=5)

"""Sending jobs to the workers, and looking at the broker (torch-free; used by the API).

``enqueue`` is best effort by design: the job row already exists in the store, and the recovery loop
re-sends a message for any queued job whose message is missing, so a broker that is down when a job
is submitted delays the job instead of losing it.
"""

from __future__ import annotations

import logging

from worker.celery_app import QUEUE, TASK_RUN_JOB, get_app
from worker.settings import Settings

log = logging.getLogger("ldd.queue")


def enqueue(job_id: str, settings: Settings | None = None) -> bool:
    """Send the ``run_job`` message for ``job_id`` to queue ``gpu``. False if the broker refused."""
    try:
        get_app(settings).send_task(TASK_RUN_JOB, args=[job_id], queue=QUEUE, routing_key=QUEUE)
        return True
    except Exception as e:  # kombu raises many kinds for an unreachable broker
        log.warning("could not send job %s to the broker (the recovery loop will retry): %s", job_id, e)
        return False


def queue_depth(settings: Settings | None = None) -> int | None:
    """Messages waiting in queue ``gpu`` (not those a worker holds); None if the broker is unreachable."""
    try:
        with get_app(settings).connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
            _, count, _ = conn.default_channel.queue_declare(queue=QUEUE, passive=True)
            return int(count)
    except Exception:
        # A queue nobody declared yet is empty, but passive declare fails on it; tell the two apart.
        return 0 if broker_ok(settings) else None


def broker_ok(settings: Settings | None = None) -> bool:
    """True when the broker accepts a connection (readiness)."""
    try:
        with get_app(settings).connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
        return True
    except Exception:
        return False

"""Sending jobs to the workers, and looking at the broker (torch-free; used by the API).

``enqueue`` is best effort by design: the job row already exists in the store, and the recovery loop
re-sends a message for any queued job whose message is missing, so a broker that is down when a job
is submitted delays the job instead of losing it.
"""

from __future__ import annotations

import logging
from typing import Any

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
            _connect(conn)
            try:
                _, count, _ = conn.default_channel.queue_declare(queue=QUEUE, passive=True)
            except conn.channel_errors:
                return 0  # nobody declared the queue yet: it is empty
            return int(count)
    except Exception:
        return None


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

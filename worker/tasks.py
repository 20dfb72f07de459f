"""The Celery task of the service: ``ldd.run_job``, one attempt at one job.

A worker loads this module through the app's ``include`` (``core.celery_app``); the API never does,
since it sends the message by name. The attempt itself knows nothing of Celery (``worker.jobs``): it
returns how it ended, and this task turns that into what the broker must hear.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import shared_task
from celery.exceptions import Reject

from core import deletion
from core.celery_app import TASK_RUN_JOB, current_settings
from core.queue import enqueue
from core.routing import job_processes, queue_for, worker_slots
from core.settings import Settings
from core.store import TERMINAL_STATES
from worker import jobs

log = logging.getLogger("ldd.worker")


# acks_late + reject_on_worker_lost: a message is acknowledged only when the attempt has ended, so a
# worker that dies mid-job leaves its message to be delivered again (the store's lease decides who runs it).
@shared_task(bind=True, name=TASK_RUN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(task: Any, job_id: str) -> str:
    settings = current_settings()
    if sent_on(job_id, settings, (task.request.delivery_info or {}).get("routing_key")):
        return "sent on"
    outcome = jobs.run_job(job_id, settings)
    if outcome in TERMINAL_STATES:  # LDD_KEEP_CHECKPOINTS: the run that ended joins those pruned
        deletion.prune_checkpoints(jobs.get_store(settings), settings)
    if outcome == "shutdown":
        # This pool process is stopping and did not start the job: give the message back untouched.
        raise Reject("worker shutting down", requeue=True)
    if outcome in jobs.REQUEUED:
        # The store has the job queued again; a new message wakes whichever worker is free (if the
        # broker refuses it, the recovery loop re-sends it).
        job = jobs.get_store(settings).get_job(job_id)
        enqueue(job_id, settings, spec=job and job["spec"])
    return outcome


def sent_on(job_id: str, settings: Settings, came_from: str | None) -> bool:
    """True when this worker has fewer slots than the job has processes and sent the job on to its own queue.

    Such a message came from a queue other than the job's (an earlier version sent every job to ``gpu``, or a
    caller gave ``enqueue`` no spec). A message from the job's own queue is run whatever the count: the worker
    was told to take that queue (``celery -Q``), and sending it back there would only loop.
    """
    job = jobs.get_store(settings).get_job(job_id)
    if job is None or job["state"] in TERMINAL_STATES:
        return False  # nothing to run: the claim drops the message
    processes, queue = job_processes(job["spec"]), queue_for(job["spec"])
    if processes <= worker_slots(settings) or queue == came_from:
        return False
    log.info("job %s runs %d processes, more than this worker's %d: sent on to queue %s", job_id, processes,
             worker_slots(settings), queue)  # fmt: skip
    enqueue(job_id, settings, spec=job["spec"])  # if the broker refuses, the recovery loop re-sends it
    return True

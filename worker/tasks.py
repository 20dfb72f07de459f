"""The Celery task of the service: ``ldd.run_job``, one attempt at one job.

A worker loads this module through the app's ``include`` (``worker.celery_app``); the API never does,
since it sends the message by name. The attempt itself knows nothing of Celery (``worker.jobs``): it
returns how it ended, and this task turns that into what the broker must hear.
"""

from __future__ import annotations

from celery import shared_task
from celery.exceptions import Reject

from worker import jobs
from worker.celery_app import TASK_RUN_JOB, current_settings
from worker.queue import enqueue


# acks_late + reject_on_worker_lost: a message is acknowledged only when the attempt has ended, so a
# worker that dies mid-job leaves its message to be delivered again (the store's lease decides who runs it).
@shared_task(name=TASK_RUN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_job(job_id: str) -> str:
    settings = current_settings()
    outcome = jobs.run_job(job_id, settings)
    if outcome == "shutdown":
        # This pool process is stopping and did not start the job: give the message back untouched.
        raise Reject("worker shutting down", requeue=True)
    if outcome in jobs.REQUEUED:
        # The store has the job queued again; a new message wakes whichever worker is free (if the
        # broker refuses it, the recovery loop re-sends it).
        enqueue(job_id, settings)
    return outcome

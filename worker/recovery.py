"""The recovery loop: the store is the source of truth, the broker only carries wake-ups.

Every worker runs it in a thread of its main process, at start and every ``recover_seconds``:

1. running jobs whose lease expired (their worker died) go back to ``queued`` (or ``failed`` when
   they have used ``max_attempts``, ``cancelled`` when a cancel was pending), and their message is
   sent again; the next attempt resumes from ``runs/<job>/checkpoints/last.pt``;
2. queued jobs whose message the broker lost (a broker restarted without persistence, a crash
   between ``create_job`` and ``enqueue``) get a new one. The broker cannot tell which messages it
   holds, so when a queue (one per job size, ``core.routing``) holds fewer than there are queued jobs
   of that size, the jobs of that size waiting longest since their last message are re-sent; a duplicate
   costs a claim that fails, nothing more;
3. studies whose jobs have all ended are finished (report written) even when no worker ran the last one.

Any number of workers may run it at once: every change is a conditional UPDATE in the store.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Any

from core import studies
from core.queue import enqueue, queue_depths
from core.routing import queue_for
from core.settings import Settings
from core.store import Store

log = logging.getLogger("ldd.recovery")

_loop: threading.Thread | None = None


def recover(store: Store, settings: Settings) -> dict[str, list[str]]:
    """One pass; returns the job ids requeued (worker lost) and re-sent (message lost), and the studies it
    finished (their last job ended without a worker to say so)."""
    requeued = store.requeue_expired(settings.max_attempts)
    for job_id in requeued:
        log.warning("job %s: its worker stopped heartbeating; queued again", job_id)
        job = store.get_job(job_id)
        enqueue(job_id, settings, spec=job and job["spec"])
    resent = resend_lost(store, settings)
    finished = studies.finish_ended(store, settings)  # e.g. its last job just failed above, with no worker
    return {"requeued": requeued, "resent": resent, "studies_finished": finished}


def resend_lost(store: Store, settings: Settings) -> list[str]:
    """Re-send, queue by queue, the messages the broker is missing for queued jobs; returns those job ids."""
    stale = store.stale_queued(settings.lease_seconds)  # oldest first
    if not stale:
        return []
    waiting = store.count_jobs_by_state()["queued"]
    specs = {j["id"]: j["spec"] for j in store.list_jobs(state="queued", limit=max(waiting, len(stale)))}
    queued = Counter(queue_for(spec) for spec in specs.values())
    depths = queue_depths(sorted(queued), settings)
    if depths is None:  # broker down: nothing can be sent now; try next time
        return []
    missing = {queue: n - depths[queue] for queue, n in queued.items()}
    resent: list[str] = []
    for job_id in stale:
        spec = specs.get(job_id)  # None: it left the queue since stale_queued
        if spec is None or missing[queue_for(spec)] <= 0:
            continue
        if not enqueue(job_id, settings, spec=spec):
            break  # the broker refuses now: the next pass tries again
        missing[queue_for(spec)] -= 1
        resent.append(job_id)
    store.mark_enqueued(resent)
    if resent:
        log.warning("re-sent lost broker messages for %s", ", ".join(resent))
    return resent


def start_recovery_loop(settings: Settings, stop: threading.Event | None = None) -> threading.Thread:
    """Start (once per process) a daemon thread running ``recover`` now and every ``recover_seconds``."""
    global _loop
    if _loop is not None and _loop.is_alive():
        return _loop
    stop = stop or threading.Event()

    def loop() -> None:
        store: Any = None
        while True:
            try:
                store = store or Store(settings.store_url)
                recover(store, settings)
            except Exception as e:  # store or broker down: the loop must outlive them
                log.warning("recovery pass failed: %s", e)
            if stop.wait(settings.recover_seconds):
                return

    _loop = threading.Thread(target=loop, name="ldd-recovery", daemon=True)
    _loop.start()
    return _loop

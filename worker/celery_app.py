"""The one Celery app of the service (torch-free: the API imports it to send messages).

The broker only carries wake-ups: a message names a job id, and the worker that receives it claims
the job in the store (``worker.store``), which is the source of truth. So a lost or duplicated
message is harmless: the recovery loop (``worker.recovery``) re-sends lost ones, and a duplicate
finds the job already claimed and returns.

The broker is ``redis://...`` in production and, by default, kombu's filesystem transport with its
folders under ``data_dir/broker`` (nothing to install); both go through this same code.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from pathlib import Path
from typing import Any

from celery import Celery, signals
from celery.exceptions import Reject
from kombu import Queue

from worker.settings import Settings

QUEUE = "gpu"
TASK_RUN_JOB = "ldd.run_job"

log = logging.getLogger("ldd.worker")

_apps: dict[tuple[str, str], Celery] = {}
_current: Settings | None = None


def broker_options(settings: Settings) -> dict[str, Any]:
    """Transport options: the embedded broker's folders, or socket timeouts for Redis."""
    if settings.embedded_broker:
        root = settings.broker_dir
        for sub in ("queue", "control"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        return {
            # One folder in and out: every producer and consumer on this machine shares the queue.
            "data_folder_in": str(root / "queue"),
            "data_folder_out": str(root / "queue"),
            "control_folder": str(root / "control"),
            "store_processed": False,
        }
    # Without timeouts a dead Redis makes enqueue() hang; with them it fails fast and the recovery
    # loop re-sends the message later. Unacked messages come back after visibility_timeout at the latest.
    return {"socket_timeout": 10, "socket_connect_timeout": 5, "visibility_timeout": 6 * 3600}


def make_app(settings: Settings) -> Celery:
    # kombu wants a host part even for the filesystem transport (else it warns on every connection).
    url = "filesystem://localhost/" if settings.embedded_broker else settings.broker_url
    app = Celery("ldd", broker=url, set_as_current=False)
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # survive broker restarts: retry forever
        broker_channel_error_retry=True,
        task_queues=[Queue(QUEUE, routing_key=QUEUE)],
        task_default_queue=QUEUE,
        task_routes={TASK_RUN_JOB: {"queue": QUEUE}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        worker_concurrency=1,
        worker_prefetch_multiplier=1,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # The store answers "what is running where"; broadcast control would need fanout on the
        # filesystem transport too, and nothing here uses it.
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )

    @app.task(name=TASK_RUN_JOB, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
    def run_job(job_id: str) -> str:
        from worker.jobs import run_job as run

        outcome = run(job_id, current_settings())
        if outcome == "shutdown":
            raise Reject("worker shutting down", requeue=True)
        return outcome

    return app


def current_settings() -> Settings:
    """The settings this process runs with (``configure`` or the ``LDD_*`` environment)."""
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current


def configure(settings: Settings) -> None:
    global _current
    _current = settings


def get_app(settings: Settings | None = None) -> Celery:
    """The app for ``settings`` (default: ``current_settings()``), made once per broker."""
    settings = settings or current_settings()
    key = (settings.broker_url, str(settings.data_dir))
    if key not in _apps:
        _apps[key] = make_app(settings)
    return _apps[key]


def __getattr__(name: str) -> Any:
    # ``celery -A worker.celery_app worker`` looks up ``app``; build it only when asked.
    if name in ("app", "celery"):
        return get_app()
    raise AttributeError(name)


# -- worker-process hooks (they fire only in a Celery worker) ------------------------------------------

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies.

    Used in the training and export children, so they die with the Celery pool process that runs
    the job (which Celery itself makes die with the worker's main process): a SIGKILLed worker leaves
    no orphan training on in the background, writing into the run folder the next attempt resumes from.
    """
    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:  # not Linux: the lease still fences the job, the orphan just wastes time
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


@signals.worker_shutting_down.connect(weak=False)
def _forward_warm_shutdown(how: str = "", **_: Any) -> None:
    """On a warm shutdown (SIGTERM to the main process, e.g. ``docker stop``) Celery would wait for
    the running job to finish, however long it trains. Pass the SIGTERM on to the pool process: the
    job it runs checkpoints its training child and goes back to the queue (``worker.jobs``)."""
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
def _start_recovery(**_: Any) -> None:
    from worker.recovery import start_recovery_loop

    start_recovery_loop(current_settings())


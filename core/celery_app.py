"""The one Celery app of the service (torch-free: the API imports it to send messages).

The broker only carries wake-ups: a message names a job id, and the worker that receives it claims
the job in the store (``core.store``), which is the source of truth. So a lost or duplicated
message is harmless: the recovery loop (``worker.recovery``) re-sends lost ones, and a duplicate
finds the job already claimed and returns.

Jobs are routed by size: a job of N processes goes to queue ``gpu`` (N = 1) or ``gpu.N``, and a worker takes
the queues of the sizes it can run (``core.routing``). Only ``gpu`` is declared here; the others are declared
by whoever sends to or consumes them first (Celery creates missing queues, the same way on both sides).

The broker is ``redis://...`` in production and, by default, kombu's filesystem transport with its
folders under ``data_dir/broker`` (nothing to install); both go through this same code.

This module is the configuration only. The task is in ``worker.tasks``, the hooks on a worker's
lifecycle in ``worker.hooks``, and the attempt at a job in ``worker.jobs``.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from core.routing import QUEUE
from core.settings import Settings

TASK_RUN_JOB = "ldd.run_job"
# What a worker imports at start (by name, so that this module, which the API imports too, needs neither):
# the task, and the hooks on the worker's own signals.
INCLUDE = ("worker.tasks", "worker.hooks")

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
    """The app for one broker. A worker made from it imports ``INCLUDE``: the task and the worker hooks."""
    # kombu wants a host part even for the filesystem transport (else it warns on every connection).
    url = "filesystem://localhost/" if settings.embedded_broker else settings.broker_url
    app = Celery("ldd", broker=url, set_as_current=False, include=list(INCLUDE))
    app.conf.update(
        broker_transport_options=broker_options(settings),
        # A broker that is down at start or restarts later: the worker waits and reconnects, forever.
        broker_connection_retry=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_channel_error_retry=True,
        task_queues=[Queue(QUEUE, routing_key=QUEUE)],
        task_default_queue=QUEUE,
        task_routes={TASK_RUN_JOB: {"queue": QUEUE}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # results live in the store
        # A worker killed mid-job: its message was not acknowledged yet, so the broker delivers it again
        # (and the lease in the store decides whether the job may run).
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A broker blip while sending: a few quick retries, then enqueue() gives up and the recovery loop
        # re-sends later (the API must not hang on a dead broker).
        task_publish_retry=True,
        task_publish_retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        # One job at a time per worker (one GPU), and no message held in reserve that another idle
        # worker could have run.
        worker_concurrency=1,
        worker_prefetch_multiplier=1,
        # A lost broker connection must not kill a training run: the store, not the broker, owns the job.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # The store answers "what is running where"; broadcast control would need fanout on the
        # filesystem transport too, and nothing here uses it.
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )
    return app


def current_settings() -> Settings:
    """The settings this process runs with (``configure`` or the ``LDD_*`` environment)."""
    global _current
    if _current is None:
        _current = Settings.from_env()
    return _current


def configure(settings: Settings) -> None:
    """Make ``settings`` this process's settings (``worker.main`` does, before starting the worker)."""
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
    # ``celery -A core.celery_app worker`` looks up ``app``; build it only when asked.
    if name in ("app", "celery"):
        return get_app()
    raise AttributeError(name)

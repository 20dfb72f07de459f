"""Starting a worker: ``python -m worker`` (what ``ldd worker`` and ``ldd up`` run) or ``run_worker(settings)``.

One Celery worker process with one pool process (``-c 1``: one job at a time), on the queues of the job sizes
it can run (``core.routing``: ``gpu``, ``gpu.2`` .. ``gpu.<slots>``, slots from ``LDD_WORKER_GPUS`` or
detected), plus the recovery loop in a thread of the main process (started when the worker is ready, by
``worker.hooks``). ``celery -A core.celery_app worker -Q gpu,gpu.2`` starts the same worker with 2 slots.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from core.celery_app import configure, get_app
from core.routing import worker_queues, worker_slots
from core.settings import Settings
from worker.hooks import RESTART

log = logging.getLogger("ldd.worker")


def worker_argv(slots: int, name: str | None = None, loglevel: str = "INFO") -> list[str]:
    """``celery worker`` arguments for a worker whose jobs may run up to ``slots`` processes."""
    name = name or f"ldd-{socket.gethostname()}-{os.getpid()}"
    return [
        "worker", "--queues", ",".join(worker_queues(slots)), "--concurrency", "1", "--prefetch-multiplier", "1",
        "--pool", "prefork", "--hostname", f"{name}@%h", "--loglevel", loglevel,
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip


def run_worker(settings: Settings | None = None, *, name: str | None = None, loglevel: str = "INFO") -> None:
    """Run a worker in this process until it is stopped.

    SIGTERM (warm shutdown): the running job checkpoints its training child and goes back to the queue
    without counting the attempt (``worker.hooks``, ``worker.jobs``); SIGQUIT: stop at once (the job's
    lease expires and the recovery loop queues it again).
    """
    settings = settings or Settings.from_env()
    # Detected once, here: the pool process and the hooks read the number from the settings.
    settings = settings.model_copy(update={"worker_gpus": worker_slots(settings)})
    settings.make_dirs()
    # Pool children and training children inherit these: they see the same settings.
    os.environ.update(settings.to_env())
    configure(settings)
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("jobs of up to %d processes (LDD_WORKER_GPUS): queues %s", settings.worker_gpus,
             ", ".join(worker_queues(settings.worker_gpus)))  # fmt: skip
    try:
        get_app(settings).worker_main(worker_argv(settings.worker_gpus, name, loglevel))
    finally:
        if RESTART.is_set():
            # The watchdog stopped a stuck consumer (worker.hooks). Celery's state cannot be restarted in
            # this interpreter, so start afresh in this same process: same pid for whoever supervises it.
            log.warning("starting the worker again after a stuck consumer")
            again = ["--loglevel", loglevel] + (["--name", name] if name else [])
            os.execv(sys.executable, [sys.executable, "-m", "worker", *again])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--name", help="worker name (default: ldd-<host>-<pid>)")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    run_worker(Settings.from_env(), name=args.name, loglevel=args.loglevel)

"""Starting a worker: ``python -m worker`` (what ``ldd worker`` and ``ldd up`` run) or ``run_worker(settings)``.

One Celery worker process on queue ``gpu`` with one pool process (``-c 1``: one job at a time per
GPU), plus the recovery loop in a thread of the main process (started when the worker is ready, by
``worker.hooks``). ``celery -A worker.celery_app worker`` starts the same worker.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

from worker.celery_app import QUEUE, configure, get_app
from worker.hooks import RESTART
from worker.settings import Settings


def worker_argv(name: str | None = None, loglevel: str = "INFO") -> list[str]:
    name = name or f"ldd-{socket.gethostname()}-{os.getpid()}"
    return [
        "worker", "--queues", QUEUE, "--concurrency", "1", "--prefetch-multiplier", "1",
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
    settings.make_dirs()
    # Pool children and training children inherit these: they see the same settings.
    os.environ.update(settings.to_env())
    configure(settings)
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        get_app(settings).worker_main(worker_argv(name, loglevel))
    finally:
        if RESTART.is_set():
            # The watchdog stopped a stuck consumer (worker.hooks). Celery's state cannot be restarted in
            # this interpreter, so start afresh in this same process: same pid for whoever supervises it.
            logging.getLogger("ldd.worker").warning("starting the worker again after a stuck consumer")
            again = ["--loglevel", loglevel] + (["--name", name] if name else [])
            os.execv(sys.executable, [sys.executable, "-m", "worker", *again])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument("--name", help="worker name (default: ldd-<host>-<pid>)")
    parser.add_argument("--loglevel", default="INFO")
    args = parser.parse_args(argv)
    run_worker(Settings.from_env(), name=args.name, loglevel=args.loglevel)

"""Which broker queue a job goes to, and which queues a worker takes (no torch, no Celery: the API, the
worker's main process and its attempts all use it).

A job of ``schedule.gpus`` = N processes goes to queue ``gpu`` when N is 1 (the one queue of earlier versions,
so their deployments keep working) and to ``gpu.N`` otherwise. A worker has ``slots``, the processes one job
may run on it (``LDD_WORKER_GPUS``; default: the GPUs it sees, or its CPU cores when it sees none, gloo), and
takes queues ``gpu``, ``gpu.2`` .. ``gpu.<slots>``. So a job only reaches a worker that can run all its
processes, and a job asking for more than any worker has waits in its queue until such a worker starts.
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Mapping
from typing import Any

from core.settings import Settings

QUEUE = "gpu"  # one-process jobs; also the queue of every job sent by earlier versions


def job_processes(spec: Mapping[str, Any]) -> int:
    """The processes a job runs (``schedule.gpus``; 1 when the spec has no schedule)."""
    return max(1, int((spec.get("schedule") or {}).get("gpus") or 1))


def queue_name(processes: int) -> str:
    """The queue of jobs that run ``processes`` processes: ``gpu``, ``gpu.2``, ``gpu.3`` ..."""
    return QUEUE if processes <= 1 else f"{QUEUE}.{processes}"


def queue_for(spec: Mapping[str, Any]) -> str:
    """The queue a job's message goes to."""
    return queue_name(job_processes(spec))


def worker_queues(slots: int) -> list[str]:
    """The queues of a worker with ``slots``: every job size it can run."""
    return [queue_name(n) for n in range(1, max(1, slots) + 1)]


def visible_gpus() -> int:
    """The GPUs this process can use: ``CUDA_VISIBLE_DEVICES`` when set, else the lines of ``nvidia-smi -L``
    (no torch: the worker's main process must not import it). 0 without a GPU or a driver."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        count = 0
        for device in visible.split(","):
            # CUDA ignores the list from its first entry that is not a device ("" or "-1" hide them all).
            if not device.strip() or device.strip().startswith("-"):
                break
            count += 1
        return count
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return 0
    # "GPU 0: NVIDIA H200 (UUID: ...)"; MIG instances are listed indented under their GPU.
    return sum(1 for line in listed.stdout.splitlines() if line.startswith("GPU "))


@functools.cache
def detected_slots() -> int:
    """A worker's slots when ``LDD_WORKER_GPUS`` is unset: its GPUs, or without one its CPU cores (gloo)."""
    return visible_gpus() or os.cpu_count() or 1


def worker_slots(settings: Settings) -> int:
    """The processes one job may run on this worker: ``LDD_WORKER_GPUS``, or what ``detected_slots`` finds."""
    return settings.worker_gpus or detected_slots()

"""The chaos bench as a client of the API: it submits the jobs over REST (with idempotency keys, retried
while the API is down), uploads the data set and reads jobs back.
"""

from __future__ import annotations

import io
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from chaos_figures import TERMINAL
from chaos_stack import Stack
from chaos_watch import Watcher

IMAGE_SIZE = (128, 96)  # the jobs' images, small: a whole job takes a minute or two on the 2-core CPU
BATCH_SIZE = 4


class Submitter:
    """Keeps up to ``in_flight`` jobs queued or running by submitting the next one whenever one ends and
    ``gate(index)`` allows it (the disruptions hold jobs back until they can use them); each POST carries an
    ``Idempotency-Key`` and is retried until the API takes it (the API may be down)."""

    def __init__(self, stack: Stack, watcher: Watcher, specs: list[dict[str, Any]], in_flight: int, token: str):
        self.stack, self.watcher, self.specs, self.in_flight, self.token = stack, watcher, specs, in_flight, token
        self.submitted: list[dict[str, Any]] = []  # {id, index, t_post, t_done}
        self.error: str | None = None
        self.stop = threading.Event()
        self.gate: Callable[[int], bool] = lambda index: True
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _active(self) -> int:
        n = 0
        for s in self.submitted:
            j = self.watcher.job(s["id"])
            n += j is None or j["state"] not in TERMINAL
        return n

    def _run(self) -> None:
        try:
            self._submit_all()
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"

    def _submit_all(self) -> None:
        for i, spec in enumerate(self.specs):
            while not self.stop.is_set() and (self._active() >= self.in_flight or not self.gate(i)):
                time.sleep(0.2)
            if self.stop.is_set():
                return
            t0 = time.time()
            job = post_json(self.stack, "/v1/jobs", spec, f"{self.token}-{i}", self.stop)
            if job is None:
                return
            self.submitted.append({"id": job["id"], "index": i, "t_post": t0, "t_done": time.time()})

    def close(self) -> None:
        self.stop.set()
        self.thread.join(30)


def post_json(
    stack: Stack, path: str, body: dict[str, Any], key: str, stop: threading.Event | None = None, timeout: float = 300
) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while not (stop and stop.is_set()):
        try:
            r = stack.http.post(path, json=body, headers={"Idempotency-Key": key}, timeout=10)
            if r.status_code < 500:
                if r.status_code >= 400:
                    raise RuntimeError(f"POST {path} refused: {r.status_code} {r.text}")
                return r.json()
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"POST {path} not accepted within {timeout:.0f} s")
        time.sleep(0.5)
    return None


def upload_dataset(stack: Stack, folder: Path) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:  # PNGs: compressing again gains nothing
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                z.write(p, p.relative_to(folder).as_posix())
    r = stack.http.post("/v1/datasets", files={"file": ("chaos.zip", buf.getvalue(), "application/zip")}, timeout=120)
    if r.status_code != 201:
        raise RuntimeError(f"dataset upload refused: {r.status_code} {r.text}")
    return r.json()["id"]


def schedule(epochs: int) -> dict[str, Any]:
    return {
        "epochs": epochs,
        "batch_size": BATCH_SIZE,
        "image_size": list(IMAGE_SIZE),
        "num_workers": 0,
        "warmup_iters": 2,
        "lr": 0.01,
    }


def get_job(stack: Stack, job_id: str) -> dict[str, Any] | None:
    try:
        r = stack.http.get(f"/v1/jobs/{job_id}", timeout=5)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None

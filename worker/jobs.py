"""One attempt at one job: the body of the Celery task ``worker.tasks.run_job`` (no Celery or torch in here).

    claim (lease) -> check the job, ids to local paths (core.checks) -> runs/<job>/spec.json
      -> child: python -m distill train spec.json --out runs/<job>   (resumes from checkpoints/last.pt;
         with schedule.gpus = N > 1: python -m torch.distributed.run --standalone --nproc_per_node N -m distill ...)
      -> child: python -m worker.export runs/<job>/model.pt runs/<job>/export runs/<job>/export.json --spec ...
         (every format of the spec's ``export.formats``, each with its AP measured by the serving runtime)
      -> worker.publish: each format published and stored (models/<mdl_<job hex>[int8|fp16]>) + the store's
         model rows (int8/fp16 first, fp32 last: the fp32 row says the job is published)
      -> succeeded

With object storage (``core.artifacts``) an attempt fetches the stored run (another machine's last checkpoint)
and uploads its own at every checkpoint and at the end: a job whose machine vanishes resumes elsewhere.

Both children run in their own process group (killable as a whole, DataLoader workers included) and
die with this process (``worker.process``). While a child runs, this process polls the store twice a
second for a cancel or a lost lease, relays ``progress.json`` into the store every ``progress_seconds``
and renews the lease every ``heartbeat_seconds``. The model id is derived from the job id, so a job
publishes one model however many attempts it takes.

An attempt returns how it ended (an ``Outcome``) and sends no broker message itself: when the job is
queued again (``REQUEUED``) the caller sends the wake-up (``worker.tasks``).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

from core import history, studies
from core.artifacts import artifacts_for
from core.checks import JobRefused, resolve_job
from core.routing import job_processes
from core.settings import Settings
from core.store import Store
from distill.files import atomic_write_json
from worker.process import die_with_parent, stop_group
from worker.publish import publish_model
from worker.room import check_room, no_room, out_of_room
from worker.room import tail as log_tail

log = logging.getLogger("ldd.worker")

ROOT = Path(__file__).resolve().parents[1]
POLL_SECONDS = 0.5

Outcome = Literal["succeeded", "failed", "cancelled", "lost", "skipped", "shutdown", "released", "retry"]
# The attempt put the job back in the queue: a broker message must wake a worker for it.
REQUEUED: frozenset[Outcome] = frozenset({"released", "retry"})

_stores: dict[tuple[int, str], Store] = {}
_shutting_down = threading.Event()  # set by SIGTERM in the pool process


def get_store(settings: Settings) -> Store:
    """One store per process (a forked process must not share its parent's connections)."""
    key = (os.getpid(), settings.store_url)
    if key not in _stores:
        _stores[key] = Store(settings.store_url)
    return _stores[key]


def model_id_for(job_id: str) -> str:
    return "mdl_" + job_id.removeprefix("job_")


def run_job(job_id: str, settings: Settings, store: Store | None = None) -> Outcome:
    """Claim ``job_id`` and run one attempt; returns how it ended.

    ``shutdown``: not started, this process is stopping (give the message back); ``skipped``: not
    claimable (a duplicate message); ``released``/``retry``: queued again, needs a new message (``REQUEUED``);
    ``lost``: another worker holds it now; else the job's final state.
    """
    if _shutting_down.is_set():
        # This pool process was told to stop while running a job; Celery may still hand it a message
        # before it exits.
        log.info("job %s: worker shutting down; not starting it", job_id)
        return "shutdown"
    store = store or get_store(settings)
    owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    job = store.claim(job_id, owner, settings.lease_seconds, max_attempts=settings.max_attempts)
    if job is None:
        # Finished, cancelled, held by a live worker, or out of attempts: a duplicate message.
        log.info("job %s not claimable; message dropped", job_id)
        studies.job_ended(store, settings, job_id)  # claim may have just failed it (attempts used up)
        return "skipped"
    log.info("job %s: attempt %d by %s", job_id, job["attempts"], owner)
    outcome = Attempt(store, settings, job, owner).run()
    if outcome in ("succeeded", "failed", "cancelled"):
        studies.job_ended(store, settings, job_id)  # the study's report, if that was its last job
    return outcome


class Lost(Exception):
    """This worker no longer holds the job's lease (or a cancel arrived): stop touching the job."""

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


class Attempt:
    """One claimed attempt: run the children, relay progress, keep the lease, end the job."""

    def __init__(self, store: Store, settings: Settings, job: dict[str, Any], owner: str):
        self.store, self.settings, self.job, self.owner = store, settings, job, owner
        self.job_id: str = job["id"]
        self.run_dir = settings.run_dir(self.job_id)
        self.progress: dict[str, Any] | None = job.get("progress")
        self.last_ok = time.monotonic()  # last time the store confirmed our lease
        self._beat_sent = time.monotonic()
        self._progress_sent = 0.0
        self._progress_mtime: float | None = None
        self._history_offset = 0  # bytes of progress.jsonl already copied into the job's history
        self._began = time.time()  # a progress.json older than this is an earlier attempt's (history)
        self.artifacts = artifacts_for(settings)
        self._checkpoint_mtime: float | None = None  # of checkpoints/last.pt when the run was last uploaded

    def run(self) -> Outcome:
        # Celery resets SIGTERM to "die" in its pool process; a worker being stopped (``ldd up``
        # Ctrl-C, ``docker stop``) should instead checkpoint the child and give the job back at once.
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            return self._run_guarded()
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        _shutting_down.set()

    def _run_guarded(self) -> Outcome:
        try:
            return self._run()
        except Lost as e:
            if e.why == "cancel":
                return self._end("cancelled", error="cancelled by request")
            if e.why == "shutdown":
                return self._release()
            log.warning("job %s: lease lost; leaving it to whoever holds it now", self.job_id)
            return "lost"
        except JobRefused as e:
            return self._end("failed", error=str(e))
        except Exception as e:
            log.exception("job %s: internal error", self.job_id)
            return self._end("failed", error=f"worker error: {type(e).__name__}: {e}")

    def _run(self) -> Outcome:
        model = self.store.model_for_job(self.job_id)
        if model is not None:  # published by an attempt that died before it could say so
            return self._succeed(model)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # With object storage: the run as another machine left it (its last uploaded checkpoint resumes here).
        if pulled := self.artifacts.pull_run(self.job_id):
            log.info("job %s: %d file(s) of the run fetched from %s", self.job_id, len(pulled), self.artifacts.url)
        model_pt, metrics_json = self.run_dir / "model.pt", self.run_dir / "metrics.json"
        if not (model_pt.is_file() and metrics_json.is_file()):
            local = resolve_job(self.job["spec"], self.store, self.settings)
            spec_path = atomic_write_json(self.run_dir / "spec.json", local, indent=2)
            args = [*_launcher(local), "-m", "distill", "train", str(spec_path), "--out", str(self.run_dir)]
            if self.settings.weights_dir is not None:
                args += ["--weights-dir", str(self.settings.weights_dir)]
            if self.settings.min_free_bytes > 0:
                args += ["--min-free-bytes", str(self.settings.min_free_bytes)]
            check_room(self.settings, "training")
            # error.json holds the child's verdict; a stale one (an earlier attempt's) would pass for this one's.
            (self.run_dir / "error.json").unlink(missing_ok=True)
            rc = self._child("train", args)
            self.artifacts.push_run(self.job_id)  # the final weights, or the last checkpoint for a retry
            if rc != 0:
                return self._child_failed("training", rc)
        metrics = json.loads(metrics_json.read_text())

        self._heartbeat({**(self.progress or {}), "phase": "export"})
        spec_path = self.run_dir / "spec.json"
        if not spec_path.is_file():  # trained by an attempt from before the spec was kept: resolve it again
            atomic_write_json(spec_path, resolve_job(self.job["spec"], self.store, self.settings), indent=2)
        export_dir, described = self.run_dir / "export", self.run_dir / "export.json"
        shutil.rmtree(export_dir, ignore_errors=True)
        check_room(self.settings, "ONNX export")
        # The formats, the data set (int8 calibration, AP per format) and the serving runtime that measures it.
        args = [
            "-m",
            "worker.export",
            str(model_pt),
            str(export_dir),
            str(described),
            "--spec",
            str(spec_path),
            "--backend",
            self.settings.backend,
        ]
        if self.settings.providers:
            args += ["--providers", ",".join(self.settings.providers)]
        rc = self._child("export", args)
        if rc != 0:
            return self._child_failed("ONNX export", rc)
        self._heartbeat(None)  # fence: still ours right before the one visible side effect
        model = publish_model(
            self.store, self.artifacts, export_dir, json.loads(described.read_text()),
            model_id=model_id_for(self.job_id), job_id=self.job_id,
            name=self.job["spec"].get("name"), kind=self.job["kind"], training_metrics=metrics.get("bbox", metrics),
        )  # fmt: skip
        return self._succeed(model, metrics)

    # -- the children ----------------------------------------------------------------------------

    def _child(self, what: str, args: list[str]) -> int:
        """Run ``python <args>`` as a supervised child; its exit code. Raises ``Lost`` on cancel/lease loss."""
        path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}
        with open(self.run_dir / "worker_child.log", "ab") as out:
            out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} attempt {self.job['attempts']}: {what}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                [sys.executable, *args], cwd=self.run_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=die_with_parent,
            )  # fmt: skip
        log.info("job %s: %s child pid %d", self.job_id, what, proc.pid)
        try:
            self._supervise(proc)
        except BaseException:
            stop_group(proc, self.settings.kill_grace_seconds, self._extend_lease)
            raise
        self._relay_progress(force=True)
        return proc.returncode

    def _supervise(self, proc: subprocess.Popen[bytes]) -> None:
        while proc.poll() is None:
            time.sleep(POLL_SECONDS)
            now = time.monotonic()
            try:
                state = self.store.control(self.job_id, self.owner)
            except Exception as e:  # the store may be briefly unreachable; the lease covers that
                log.warning("job %s: store unreachable: %s", self.job_id, e)
                state = "unknown"
            if state in ("cancel", "lost"):
                raise Lost(state)
            if _shutting_down.is_set():
                raise Lost("shutdown")
            if state == "ok":
                self.last_ok = now
            elif now - self.last_ok > 0.8 * self.settings.lease_seconds:
                # We cannot renew the lease, so soon another worker may run this job: stop first.
                raise Lost("lost")
            self._relay_progress()
            self._upload_checkpoint()

    def _upload_checkpoint(self) -> None:
        """With object storage, upload the run (checkpoint, logs) each time the trainer has written a checkpoint:
        what another machine resumes from if this one vanishes."""
        try:
            mtime: float | None = (self.run_dir / "checkpoints" / "last.pt").stat().st_mtime
        except FileNotFoundError:
            mtime = None
        if self.artifacts.remote and mtime is not None and mtime != self._checkpoint_mtime:
            self._checkpoint_mtime = mtime
            try:
                self.artifacts.push_run(self.job_id)
            except Exception as e:  # storage briefly unreachable: the next checkpoint tries again
                log.warning("job %s: cannot upload the run: %s", self.job_id, e)

    def _relay_progress(self, force: bool = False) -> None:
        """Copy a changed ``progress.json`` into the store (at most every ``progress_seconds`` unless
        ``force``); otherwise renew the lease every ``heartbeat_seconds``."""
        now = time.monotonic()
        path = self.run_dir / "progress.json"
        try:
            mtime: float | None = path.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        if (
            mtime is not None
            and mtime != self._progress_mtime
            and (force or now - self._progress_sent >= self.settings.progress_seconds)
        ):
            try:
                self.progress = json.loads(path.read_text())
                self._progress_mtime = mtime
            except (OSError, ValueError):  # replaced atomically, but a reader can still race a writer
                pass
            self._copy_history()
            self._heartbeat(self.progress)
            self._progress_sent = now
        elif now - self._beat_sent >= self.settings.heartbeat_seconds:
            self._heartbeat(None)

    def _copy_history(self) -> None:
        """Append every complete record of ``progress.jsonl`` not yet copied to the job's history: the relay
        to ``jobs.progress`` is throttled and keeps the latest record only, but a curve needs them all."""
        try:
            with open(self.run_dir / "progress.jsonl", "rb") as f:
                f.seek(self._history_offset)
                chunk = f.read()
        except OSError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]  # the trainer may be halfway through its last line
        self._history_offset += len(complete)
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            history.record(self.store, self.job_id, self.job["attempts"], record, self._began)

    def _heartbeat(self, progress: dict[str, Any] | None) -> None:
        try:
            ok = self.store.heartbeat(self.job_id, self.owner, progress)
        except Exception as e:
            log.warning("job %s: heartbeat failed: %s", self.job_id, e)
            return
        self._beat_sent = time.monotonic()
        if not ok:
            raise Lost(self.store.control(self.job_id, self.owner))
        self.last_ok = time.monotonic()

    def _extend_lease(self) -> None:
        """Renew the lease without caring why the job stops (used while stopping a child)."""
        if time.monotonic() - self._beat_sent >= self.settings.heartbeat_seconds:
            self.store.heartbeat(self.job_id, self.owner)
            self._beat_sent = time.monotonic()

    def _child_failed(self, what: str, rc: int) -> Outcome:
        err_file = self.run_dir / "error.json"
        message = None
        if err_file.is_file():
            try:
                message = json.loads(err_file.read_text()).get("error")
            except (OSError, ValueError):
                pass
        tail = log_tail(self.run_dir / "worker_child.log", 5)
        if out_of_room(message or "", tail):
            # Retrying cannot help until someone frees space; the atomic writes kept the last good checkpoint.
            return self._end(
                "failed",
                error=no_room(self.settings, f"{what} ran out of room")
                + (" Its last good checkpoint is kept in the run folder."),
            )
        if rc in (1, 2) and message:  # the program's own verdict: retrying won't help
            return self._end("failed", error=f"{message} (a failure of the job itself: not retried)")
        # Killed by a signal (OOM killer, someone's kill) or crashed without a verdict: maybe transient.
        why = f"{what} process " + (f"killed by signal {-rc}" if rc < 0 else f"exited with code {rc}")
        if message:
            why += f": {message}"
        if tail:
            why += f" (log: {tail})"
        if self.job["attempts"] < self.settings.max_attempts:
            return self._retry(why)
        return self._end("failed", error=f"gave up after {self.job['attempts']} interrupted attempt(s); last: {why}")

    # -- publishing and ending -------------------------------------------------------------------

    def _succeed(self, model: dict[str, Any], metrics: dict[str, Any] | None = None) -> Outcome:
        if metrics is None:
            path = self.run_dir / "metrics.json"
            metrics = json.loads(path.read_text()) if path.is_file() else None
        progress = {**(self.progress or {}), "phase": "done"}
        return self._end("succeeded", model_id=model["id"], metrics=metrics, progress=progress)

    def _release(self) -> Outcome:
        log.warning("job %s: worker shutting down; job queued again (resumes from its checkpoint)", self.job_id)
        if self.store.release(self.job_id, self.owner, "the worker running it was shut down") is None:
            return "lost"
        return "released"

    def _retry(self, why: str) -> Outcome:
        log.warning("job %s: attempt %d ended (%s); queued again", self.job_id, self.job["attempts"], why)
        if self.store.finish(self.job_id, self.owner, "queued", last_error=why) is None:
            return "lost"
        return "retry"

    def _end(self, state: Literal["succeeded", "failed", "cancelled"], **fields: Any) -> Outcome:
        if self.progress is not None and "progress" not in fields:
            fields["progress"] = self.progress
        done = self.store.finish(self.job_id, self.owner, state, **fields)
        log.info("job %s: %s%s", self.job_id, state, f" ({fields['error']})" if fields.get("error") else "")
        return state if done is not None else "lost"


def _launcher(spec: dict[str, Any]) -> list[str]:
    """Python's arguments before ``-m distill``: nothing for one process; ``torchrun`` (``standalone``: its
    own rendezvous on a free local port) for ``schedule.gpus`` > 1. The ranks run in sessions of their own
    (``worker.process`` explains how a stop still reaches every one)."""
    processes = job_processes(spec)
    if processes <= 1:
        return []
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]

"""The chaos bench's disruptions: SIGKILLing a worker during training, export or publish, and restarting
Redis, PostgreSQL or the API, each at a moment chosen from what the observers see; and a watchdog that
restarts a worker that stopped taking jobs (recorded as a failure).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from chaos_client import Submitter
from chaos_figures import TERMINAL, last_error_line, next_progress
from chaos_stack import Stack, progress_file, sql_one
from chaos_watch import Watcher
from servers import descendants, kill, kill_pid, pid_alive, wait_for

KILLS = ("train", "export", "publish")
SERVICES = ("redis", "postgres", "api")
SETTLE_S = 240.0  # the longest a disruption may take to recover before the bench moves on


@dataclass
class Disruption:
    kind: str
    t: float = 0.0  # when it struck (unix time)
    job: str | None = None  # the job hit (worker kills)
    attempt: int | None = None  # its attempt number then
    at: str = ""  # where it struck, in words
    t_back: float | None = None  # the killed worker's family gone / the service answering again
    affected: list[str] = field(default_factory=list)  # jobs running then (service restarts)
    extra: dict[str, Any] = field(default_factory=dict)


class Chaos:
    def __init__(
        self, stack: Stack, watcher: Watcher, submitter: Submitter, rng: random.Random, outage_s: float, stall_s: float
    ):
        self.stack, self.watcher, self.submitter, self.rng, self.outage_s = stack, watcher, submitter, rng, outage_s
        self.stall_s = stall_s
        self.rescues: list[Disruption] = []
        self.killed: set[str] = set()
        self.targets: dict[str, int] = {}  # job -> the training iteration at which to kill it
        self.delays: dict[int, float] = {}  # export child pid -> how long after its start to kill it
        self.publish_kills = 0

    def all_done(self) -> bool:
        """Every job submitted and ended. Also the watchdog's tick (every wait of the bench calls this)."""
        if self.submitter.error is not None:
            raise RuntimeError(f"submitting a job failed: {self.submitter.error}")
        self.watchdog()
        subs = self.submitter.submitted
        if len(subs) < len(self.submitter.specs):
            return False
        return all((self.watcher.job(s["id"]) or {}).get("state") in TERMINAL for s in subs)

    def watchdog(self) -> None:
        """A job queued for ``stall_s`` while a worker took nothing for as long: that worker stopped taking
        work (a failure the figures must show; normally an idle worker claims a queued job within seconds).
        Restart it, as an operator would, and record it, so that the bench can go on."""
        now = time.time()
        with self.watcher.lock:
            waiting = {s["id"]: hist[-1][0] for s in self.submitter.submitted
                       if (hist := self.watcher.sql.get(s["id"])) and hist[-1][1] == "queued"}  # fmt: skip
        if not waiting or now - min(waiting.values()) < self.stall_s:
            return
        idle = [slot for slot in range(len(self.stack.workers)) if now - self.watcher.last_busy(slot) > self.stall_s]
        if not idle:
            return
        job = min(waiting, key=waiting.__getitem__)
        d = Disruption("rescue", now, affected=list(waiting), at=f"job {job[-8:]} queued for {now - waiting[job]:.0f} "
                       f"s while worker(s) {', '.join(map(str, idle))} took nothing: restarted (SIGTERM)")  # fmt: skip
        print(f"chaos: {d.at}", file=sys.stderr)
        d.extra["last_errors"] = {slot: last_error_line(self.stack.worker_log(slot)) for slot in idle}
        for slot in idle:
            w = self.stack.workers[slot]
            if w is not None:
                w.terminate()
                try:
                    w.wait(30)
                except subprocess.TimeoutExpired:
                    for p in descendants(w.pid):
                        kill_pid(p)
                    kill(w)
            self.stack.start_worker(slot)
        d.t_back = time.time()
        self.rescues.append(d)

    def running_jobs(self) -> list[str]:
        subs = self.submitter.submitted
        return [s["id"] for s in subs if (self.watcher.job(s["id"]) or {}).get("state") == "running"]

    def candidates(self, what: str) -> list[tuple[int, dict[str, Any]]]:
        """Live children of submitted jobs not killed yet, with a known worker, oldest first."""
        ours = {s["id"] for s in self.submitter.submitted}
        live = self.watcher.live_children(what).items()
        return sorted(((p, c) for p, c in live if c["job"] in ours and c["job"] not in self.killed
                       and c["worker"] is not None), key=lambda pc: pc[1]["first"])  # fmt: skip

    def arm(self, pick: Callable[[], Any], what: str) -> Any:
        """Poll ``pick`` until it returns a target; None when every job ended first."""
        while not self.all_done():
            target = pick()
            if target:
                return target
            time.sleep(0.1)
        print(f"chaos: no moment for {what} before the jobs ended; skipped", file=sys.stderr)
        return None

    # -- worker kills

    def kill_worker(self, kind: str) -> Disruption | None:
        pick = {"train": self._pick_train, "export": self._pick_export, "publish": self._pick_publish}[kind]
        target = self.arm(pick, f"a kill during {kind}")
        if target is None:
            return None
        job_id, slot, at = target
        return self._kill(kind, job_id, slot, at)

    def _pick_train(self) -> tuple[str, int, str] | None:
        for _pid, c in self.candidates("train"):
            p = progress_file(self.stack, c["job"])
            total = p.get("total_iters") or 0
            if p.get("phase") != "train" or total < 2 or p.get("iter", 0) >= total:
                continue  # not training (yet, or any more)
            # After the first epoch's checkpoint, so that the kill exercises the resume (a kill in epoch 1
            # simply starts again from scratch).
            per_epoch = total // max(1, p.get("epochs") or 1)
            target = self.targets.setdefault(c["job"], self.rng.randint(min(per_epoch + 1, total - 1), total - 1))
            if p.get("iter", 0) >= target:
                return c["job"], c["worker"], f"train, iter {p['iter']}/{total}"
        return None

    def _pick_export(self) -> tuple[str, int, str] | None:
        now = time.time()
        for pid, c in self.candidates("export"):
            delay = self.delays.setdefault(pid, self.rng.uniform(1.0, 20.0))
            if now - c["first"] >= delay and pid_alive(pid, c["start"]):
                return c["job"], c["worker"], f"export, its child running {now - c['first']:.1f} s"
        return None

    def _pick_publish(self) -> tuple[str, int, str] | None:
        """Follow one export child; once it has exited, watch the registry folder closely and strike when
        this job's model appears there: in its hidden temporary folder (the copy being made and hashed),
        or, every second publish kill, renamed into place (before the store has recorded it)."""
        live = self.candidates("export")
        if not live:
            return None
        pid, c = live[0]
        models = self.stack.models_dir
        while pid_alive(pid, c["start"]):
            time.sleep(0.005)
        t_exit = time.time()
        # The worker notices the exit at its next poll (up to half a second later) before it publishes.
        before = set(os.listdir(models)) if models.is_dir() else set()
        want_final = self.publish_kills % 2 == 1
        while time.time() - t_exit < 20:
            new = (set(os.listdir(models)) if models.is_dir() else set()) - before
            final = sorted(n for n in new if not n.startswith("."))
            hidden = sorted(n for n in new if n.startswith("."))
            if final or (hidden and not want_final):
                self.publish_kills += 1
                where = f"folder {final[0]} in place" if final else f"copy in {hidden[0]}"
                return c["job"], c["worker"], f"publish, {where}, {(time.time() - t_exit) * 1000:.0f} ms after export"
            if (self.watcher.job(c["job"]) or {}).get("state") in TERMINAL:
                return None  # published before we saw it: try the next job
            time.sleep(0.002)
        return None

    def _kill(self, kind: str, job_id: str, slot: int, at: str) -> Disruption:
        w = self.stack.workers[slot]
        assert w is not None
        family = descendants(w.pid)
        d = Disruption(kind, time.time(), job_id, None, at)
        w.send_signal(signal.SIGKILL)  # the main process only: its pool and training children must follow
        w.wait(10)
        self.killed.add(job_id)
        # No other attempt can start before the lease expires: what the store says now is what the kill left.
        state, d.attempt = sql_one(self.stack, "SELECT state, attempts FROM jobs WHERE id = %s", job_id)
        d.extra["job_state"] = state
        d.extra["model_rows"] = sql_one(self.stack, "SELECT count(*) FROM models WHERE job_id = %s", job_id)[0]
        try:
            wait_for(lambda: not any(pid_alive(p) for p in family), 15, "the killed worker's children to die", 0.02)
            d.extra["orphans"] = 0
        except TimeoutError:
            left = [p for p in family if pid_alive(p)]
            d.extra["orphans"] = len(left)
            for p in left:
                kill_pid(p)
        d.t_back = time.time()
        self.stack.start_worker(slot)
        print(f"chaos: SIGKILLed worker {slot} ({kind}: {job_id}, attempt {d.attempt}, {at})", file=sys.stderr)
        if state == "running":
            self._settle(lambda: self._next_progress_after(job_id, d.t, (d.attempt or 0) + 1))
        return d

    def _next_progress_after(self, job_id: str, t: float, min_attempts: int) -> bool:
        with self.watcher.lock:
            hist = list(self.watcher.rest.get(job_id, []))
        return next_progress(hist, t, min_attempts) is not None

    def _settle(self, done: Callable[[], bool]) -> None:
        try:
            wait_for(lambda: done() or self.all_done(), SETTLE_S, "recovery", 0.2)
        except TimeoutError:
            print("chaos: no recovery within the settle time; going on", file=sys.stderr)

    # -- service restarts

    def restart(self, kind: str) -> Disruption | None:
        if kind == "redis":
            # The moment a job's export child exits: the job ends within a second, the worker acknowledges
            # its message and asks for the next, and the next job is submitted, all while the broker is down.
            def pick() -> bool:
                live = self.candidates("export")
                if not live:
                    return False
                pid, c = live[0]
                while pid_alive(pid, c["start"]):
                    time.sleep(0.005)
                return True
        else:

            def pick() -> bool:
                return any(progress_file(self.stack, j).get("phase") == "train" for j in self.running_jobs())

        if self.arm(pick, f"a {kind} restart") is None:
            return None
        # Watched: the jobs training now (their progress records show when the service works again); a job
        # in export writes none until it ends, so it is listed but not timed.
        running = self.running_jobs()
        training = [j for j in running if progress_file(self.stack, j).get("phase") == "train"]
        d = Disruption(kind, time.time(), affected=training)
        d.extra["also_running"] = [j for j in running if j not in training]
        n_before = len(self.submitter.submitted)
        if kind == "redis":
            self.stack.redis.stop()
            d.at = "SIGKILL, append-only file kept"
            # Down until a job was submitted meanwhile (its message cannot be sent) and then ``outage_s``.
            try:
                wait_for(lambda: len(self.submitter.submitted) > n_before or self.all_done(), 30, "a submission",
                         0.1)  # fmt: skip
            except TimeoutError:
                pass
            time.sleep(self.outage_s)
            self.stack.redis.start()
            d.extra["submitted_while_down"] = [s["id"] for s in self.submitter.submitted[n_before:]]
        elif kind == "postgres":
            self.stack.stop_pg("immediate")
            d.at = "pg_ctl stop -m immediate (a crash), start after the outage"
            time.sleep(self.outage_s)
            self.stack.start_pg()
        else:
            self.stack.kill_api()
            d.at = "SIGKILL, started again at once"
            self.stack.start_api(wait=False)
            self.stack.wait_api()
        d.t_back = time.time()
        print(f"chaos: restarted {kind} (down {d.t_back - d.t:.1f} s)", file=sys.stderr)
        jobs = d.affected + d.extra.get("submitted_while_down", [])
        self._settle(lambda: all(self._next_progress_after(j, d.t, 0) for j in jobs))
        return d

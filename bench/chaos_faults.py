"""The chaos bench's disruptions: SIGKILLing a worker during training, export or publish (losing its whole
machine: ``chaos_machine``), and restarting Redis, PostgreSQL or the API, each at a moment chosen from what the
observers see; and a watchdog that restarts a worker that stopped taking jobs (recorded as a failure).

Every moment is found in the jobs' own progress, never on a clock, so that a faster or slower machine
only changes how long the bench takes:
- a kill in training, and a PostgreSQL or API restart, strike when a job's ``progress.json`` reaches a
  target iteration between the end of its first epoch and the end of its last-but-one. Every epoch end is
  reported, so a report at or after the target and before the end of training always comes, however short
  the steps. A kill then waits a random part of an epoch (``strike_delay``), so that it also costs work
  done since the last checkpoint; a restart strikes at once;
- a kill in export strikes at a fraction of the export time measured on the teacher job; a kill in publish
  and the Redis restart follow an export child to its exit;
- jobs are handed to the submitter only as the plan can use them (``may_submit``): a job that ran while no
  disruption could strike would be one fewer for the disruptions still to come. The epochs come from the
  step time measured on the teacher (``size_epochs``).
"""

from __future__ import annotations

import math
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
# Kinds that strike while a job trains: the job must not be past its training to serve them.
IN_TRAINING = ("train", "postgres", "api", "machine")


@dataclass
class Timing:
    """What the bench measured before the disruptions (on the gfl_tiny teacher job, which trains the student's
    architecture on the same data, under the same two workers) and the work it chose from it."""

    step_s: float | None  # seconds per training iteration; None if it could not be measured
    export_s: float | None  # seconds of the teacher's ONNX export child
    per_epoch: int  # iterations per epoch (train images / batch size)
    epochs: int  # chosen for each distillation job
    train_s: float  # the training time aimed at per job

    def planned_train_s(self) -> float | None:
        return None if self.step_s is None else round(self.step_s * self.per_epoch * self.epochs, 1)


def size_epochs(step_s: float | None, per_epoch: int, train_s: float, min_epochs: int, max_epochs: int = 200) -> int:
    """Epochs for each distillation job so that it trains for at least ``train_s`` seconds at ``step_s`` per
    iteration (a distillation step also runs the teacher, so it is no faster than the measured training step:
    the jobs train at least that long). ``min_epochs`` (2 or more) leaves an epoch end between the first and
    the last one for the strikes in training; without a measurement, ``min_epochs``."""
    if step_s is None or step_s <= 0:
        return min_epochs
    return max(min_epochs, min(max_epochs, math.ceil(train_s / (step_s * per_epoch))))


def strike_window(per_epoch: int, total: int) -> tuple[int, int] | None:
    """The iterations at which a strike in training may be aimed: from the end of the first epoch (its
    checkpoint written: a kill then exercises the resume) to the end of the last-but-one (an epoch still to
    train after it). Both ends are epoch ends, which are always reported. None with fewer than two epochs."""
    lo, hi = per_epoch, total - per_epoch
    return (lo, hi) if per_epoch >= 1 and hi >= lo else None


def due(progress: dict[str, Any], target: int) -> bool:
    """A job's latest progress record says it has trained to ``target`` and is still training."""
    it, total = progress.get("iter") or 0, progress.get("total_iters") or 0
    return progress.get("phase") == "train" and target <= it < total


def strike_delay(u: float, it: int, total: int, per_epoch: int, step_s: float | None) -> float:
    """Seconds after a progress record at iteration ``it`` at which to kill: a fraction ``u`` (0 to 1) of the
    next epoch, or of the training left when less, at the teacher's step time. A distillation step is no faster
    than that, so the kill still lands in training. 0 without a measured step."""
    if not step_s:
        return 0.0
    return u * max(0, min(per_epoch, total - it - 1)) * step_s


def may_submit(left_after: int, pending: int, starving: bool, release: bool) -> bool:
    """Whether the submitter may hand in the next job: ``left_after`` jobs would remain unsubmitted and
    ``pending`` planned disruptions have not struck yet (0 once the plan is through). Each disruption needs
    at most one fresh job, so the bench keeps that many back; it lets one more go when the armed disruption
    has no running job that can serve it (``starving``) or needs a submission now (``release``: a job sent
    while Redis is down)."""
    return release or starving or left_after >= pending


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
        self,
        stack: Stack,
        watcher: Watcher,
        submitter: Submitter,
        rng: random.Random,
        outage_s: float,
        stall_s: float,
        plan: list[str],
        timing: Timing,
    ):
        self.stack, self.watcher, self.submitter, self.rng, self.outage_s = stack, watcher, submitter, rng, outage_s
        self.stall_s, self.plan, self.timing = stall_s, plan, timing
        self.rescues: list[Disruption] = []
        self.killed: set[str] = set()
        self.targets: dict[tuple[str, str], int] = {}  # (kind, job) -> the training iteration to strike at
        self.delays: dict[int, float] = {}  # export child pid -> how long after its start to kill it
        # job -> (the iteration first seen due, that record's time, seconds after it to kill)
        self.fire: dict[str, tuple[int, float, float]] = {}
        self.publish_kills = 0
        self.finished = 0  # planned disruptions that struck or found no moment (counted when they strike)
        self.armed: str | None = None  # the kind waiting for its moment
        self.release_below: int | None = None  # let jobs go until this many are submitted (Redis down)
        submitter.gate = self.may_submit

    def run_plan(self) -> list[Disruption]:
        """Each planned disruption in turn; a disruption that finds no moment before every job ended is left
        out of the list (the report names it)."""
        from chaos_machine import lose_machine  # the worker machine lost (its module imports this one)

        done: list[Disruption] = []
        for kind in self.plan:
            run = self.kill_worker if kind in KILLS else self.restart
            d = lose_machine(self) if kind == "machine" else run(kind)
            if d is not None:
                done.append(d)
        return done

    def may_submit(self, index: int) -> bool:
        """The submitter's gate for job ``index`` (``may_submit``)."""
        pending = len(self.plan) - self.finished
        release = self.release_below is not None and len(self.submitter.submitted) < self.release_below
        return may_submit(len(self.submitter.specs) - index - 1, pending, self._starving(), release)

    def _starving(self) -> bool:
        """The armed disruption has no job in flight that could still serve it."""
        kind = self.armed
        if kind is None:
            return False
        for s in self.submitter.submitted:
            j = self.watcher.job(s["id"])
            if j is not None and j.get("state") in TERMINAL:
                continue
            if kind not in ("postgres", "api") and s["id"] in self.killed:
                continue  # kills strike a job once; Redis waits for the export of a job not killed
            if kind in IN_TRAINING and progress_file(self.stack, s["id"]).get("phase") not in (None, "train"):
                continue  # past its training (evaluating, exporting)
            return False
        return True

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

    def arm(self, kind: str, pick: Callable[[], Any], what: str) -> Any:
        """Poll ``pick`` until it returns a target; None when every job ended first. The poll is well below
        the shortest time a reported epoch end stays the latest record (a second, or an epoch)."""
        self.armed = kind
        try:
            while not self.all_done():
                target = pick()
                if target:
                    return target
                time.sleep(0.05)
        finally:
            # Struck (or given up): from now on the gate keeps jobs back only for the disruptions after it, so
            # the next one's job may start while this one settles.
            self.armed = None
            self.finished += 1
        print(f"chaos: no moment found for {what} before the jobs ended", file=sys.stderr)
        return None

    def _target(self, kind: str, job: str, p: dict[str, Any]) -> int | None:
        """The iteration at which ``kind`` strikes ``job`` (drawn once per job from ``strike_window``)."""
        total = p.get("total_iters") or 0
        window = strike_window(total // max(1, p.get("epochs") or 1), total)
        if window is None:
            return None
        return self.targets.setdefault((kind, job), self.rng.randint(*window))

    # -- worker kills

    def kill_worker(self, kind: str) -> Disruption | None:
        pick = {"train": self._pick_train, "export": self._pick_export, "publish": self._pick_publish}[kind]
        target = self.arm(kind, pick, f"a kill during {kind}")
        if target is None:
            return None
        job_id, slot, at = target
        return self._kill(kind, job_id, slot, at)

    def _pick_train(self) -> tuple[str, int, str] | None:
        now = time.time()
        for _pid, c in self.candidates("train"):
            p = progress_file(self.stack, c["job"])
            if p.get("phase") != "train":
                continue  # not training (yet, or any more)
            target = self._target("train", c["job"], p)
            if target is None or not due(p, target):
                continue
            # The record that made it due is often an epoch end, just checkpointed: strike a while later, inside
            # the epoch, so that the kill also costs the work since that checkpoint (what resume must bound).
            total, per_epoch = p["total_iters"], p["total_iters"] // max(1, p.get("epochs") or 1)
            if c["job"] not in self.fire:
                u = self.rng.uniform(0.1, 0.9)
                delay = strike_delay(u, p["iter"], total, per_epoch, self.timing.step_s)
                self.fire[c["job"]] = (p["iter"], p.get("time", now), delay)
            seen, t_seen, delay = self.fire[c["job"]]
            if now >= t_seen + delay:
                return c["job"], c["worker"], (f"train, aimed at iter {target}, iter {seen}/{total} reported, "
                                               f"struck {now - t_seen:.1f} s after it")  # fmt: skip
        return None

    def _pick_export(self) -> tuple[str, int, str] | None:
        now = time.time()
        # In the first half of an export as long as the teacher's (10 s when it was not measured): the student's
        # has the same architecture, and a shorter one than measured must not end before the kill.
        export_s = self.timing.export_s or 10.0
        for pid, c in self.candidates("export"):
            delay = self.delays.setdefault(pid, self.rng.uniform(0.1, 0.5) * export_s)
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
        models = self.stack.registry_dir(c["worker"])
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
                # Jobs with a training child alive now: a job killed a moment ago still reads "running" in the
                # store, and its last record "train", until its lease expires.
                training = {c["job"] for c in self.watcher.live_children("train").values()}
                for j in self.running_jobs():
                    if j not in training:
                        continue
                    p = progress_file(self.stack, j)
                    target = self._target(kind, j, p)
                    if target is not None and due(p, target):
                        return True
                return False

        if self.arm(kind, pick, f"a {kind} restart") is None:
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
            self.release_below = n_before + 1
            try:
                wait_for(lambda: len(self.submitter.submitted) > n_before or self.all_done(), 30, "a submission",
                         0.1)  # fmt: skip
            except TimeoutError:
                pass
            self.release_below = None
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

"""Reliability under failures (DESIGN section 5): small distillation jobs on the production pairing
(Redis broker, PostgreSQL store, two ``python -m worker`` processes, the API under uvicorn) while
workers are SIGKILLed during training, export and publish, and Redis, PostgreSQL and the API restart.

    python bench/chaos.py                      # 10 distillation jobs, about 10-15 min on the 2-core CPU
    python bench/chaos.py --quick              # 2 jobs, one kill during training (development)
    python bench/chaos.py --jobs 4 --plan train,redis,postgres,api    # choose the disruptions
    python bench/chaos.py --jobs 2 --plan machine,train --out chaos_machine   # a worker machine lost (S3)

The work is sized on the machine it runs on: the teacher jobs' training steps are timed, and each
distillation job gets the epochs that make it train about ``--train-seconds`` (at least ``--epochs``).
Every disruption strikes at a point of a job's own progress (``chaos_faults``), and jobs are submitted
only as the plan can use them, so each planned disruption finds its moment on a fast or a slow machine.
One that still finds none is reported as such, apart from the verdict, which judges the invariants only.
Exit status: 0 PASS, 1 FAIL, 2 PASS but a planned disruption found no moment.

The stack is the bench's own: a redis-server (append-only file on) and a PostgreSQL cluster on free
ports in temporary folders, so the machine's shared servers are never touched; everything is torn
down at the end, also on Ctrl-C or an error (``--keep`` keeps the folders and logs). Jobs go in over
REST only; the bookkeeping reads the store's tables with SQL, the run folders and ``/proc``.

With ``--storage s3`` (the default when the plan has ``machine``) the artifacts live in object storage (moto's
S3 server, ``LDD_STORAGE_URL=s3://<bucket>/ldd``) and each worker and the API get a data folder of their own,
as on machines of their own; ``machine`` then loses a worker's machine mid-training (``chaos_machine``: every
process of it SIGKILLed at once, its data folder deleted, a replacement worker on a new empty folder) and the
job must resume from the checkpoint in the bucket. Models are then counted in the bucket, not a folder.

Figures (each also explained in the report):
- succeeded: jobs in state ``succeeded`` at the end, of those submitted;
- models per job: rows of the store's ``models`` table per job, and folders of the model registry
  (with s3: model folders in the bucket with their ``.manifest.json``) that a row of the job names (exactly 1 each);
- ran twice at once: an attempt runs its work in child processes whose command lines name the job's
  run folder; ``/proc`` is scanned every 0.2 s and a job is flagged when two such children of it are
  alive at once. Independently, ``progress.jsonl`` may only go back in iterations at a line that says
  it resumed there (or at a fresh start at 0): two trainers writing at once would break that;
- epochs repeated per kill: the last iteration reported before the kill minus the iteration the next
  attempt resumed from (``resumed_from_iter``, cross-checked with ``train.log``), in epochs; after a
  kill in export or publish, the iterations trained again;
- recovery: from the disruption to the affected job's next progress as a client sees it through
  ``GET /v1/jobs`` (a progress record written after the disruption, or the job's end), with the
  lease expiry, the new claim and the new child process as steps for worker kills.

Prints the tables and writes ``bench/results/chaos.json|md`` (``--out`` to change the name).

This file runs the bench; its parts, beside it: ``chaos_stack`` (the service), ``chaos_watch`` (the
observers), ``chaos_client`` (jobs over REST), ``chaos_faults`` (the disruptions), ``chaos_figures`` and
``chaos_report`` (the figures, the verdict, the report); ``servers`` (ports, redis-server, ``/proc``) is
shared with the tests.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from chaos_client import BATCH_SIZE, IMAGE_SIZE, Submitter, get_job, post_json, schedule, upload_dataset
from chaos_faults import KILLS, SERVICES, Chaos, Timing, size_epochs
from chaos_figures import TERMINAL, step_seconds
from chaos_machine import MACHINE
from chaos_report import collect, missing_moments, render, verdict
from chaos_stack import ROOT, Stack, progress_lines
from chaos_watch import Watcher
from report import provenance, save
from servers import wait_for

# Six kills and three restarts. A kill in export or publish costs a whole export again (the longest part of a
# small job on this CPU), so there are fewer of those than of kills in training.
FULL_PLAN = ("train", "redis", "export", "postgres", "publish", "train", "api", "publish", "train")
KINDS = (*KILLS, MACHINE, *SERVICES)  # machine: a worker machine lost (object storage, chaos_machine)


def run(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    prov = provenance()  # the commit and date the run started at (others may commit while it runs)
    root = Path(tempfile.mkdtemp(prefix="ldd-chaos-"))
    env = {"LDD_LEASE_SECONDS": str(args.lease), "LDD_HEARTBEAT_SECONDS": "1", "LDD_PROGRESS_SECONDS": "1",
           "LDD_RECOVER_SECONDS": "2", "LDD_MAX_ATTEMPTS": "3", "LDD_KILL_GRACE_SECONDS": "5",
           # The worker's own watchdog (worker.hooks) acts well before the bench's (--stall): the bench's
           # restarts count as failures, the worker's as the fix working.
           "LDD_CONSUMER_STALL_SECONDS": "20",
           # Two workers share the two cores: one thread per training child, not two each.
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # fmt: skip
    stack = Stack(root, 2, env, args.storage)
    watcher = Watcher(stack)
    submitter: Submitter | None = None
    t_start = time.time()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        print(f"chaos: stack under {root} (pg {stack.pg_root})", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "distill.data.synthetic", str(root / "data"), "--train", str(args.images),
                        "--val", "8", "--size", *map(str, IMAGE_SIZE), "--classes", "3", "--seed", str(args.seed)],
                       check=True, cwd=ROOT, env=stack.env, capture_output=True)  # fmt: skip
        stack.init_pg()
        stack.redis.start()
        stack.start_storage()
        stack.start_api()
        for slot in range(len(stack.workers)):
            stack.start_worker(slot)
        watcher.start()
        dataset = upload_dataset(stack, root / "data")

        # Teachers: ordinary train jobs on the same data, run before the disruptions start.
        token = f"chaos-{os.getpid()}-{int(t_start)}"
        teacher_archs = ["gfl_tiny"] if args.quick else ["gfl_tiny", "gfl_small"]
        teachers = [post_json(stack, "/v1/jobs", {"kind": "train", "name": f"teacher-{a}", "dataset": dataset,
                                                  "student": {"arch": a}, "schedule": schedule(args.teacher_epochs),
                                                  "seed": 0}, f"{token}-teacher-{a}")
                    for a in teacher_archs]  # fmt: skip
        teacher_ids = [t["id"] for t in teachers if t]
        wait_for(lambda: all((get_job(stack, t) or {}).get("state") in TERMINAL for t in teacher_ids), 900,
                 "the teacher jobs", 1.0)  # fmt: skip
        for t in teacher_ids:
            if (get_job(stack, t) or {}).get("state") != "succeeded":
                raise RuntimeError(f"teacher job {t} did not succeed: {get_job(stack, t)}")
        t_teachers = time.time()
        timing = measure(stack, watcher, teacher_ids[0], args)
        print(f"chaos: teachers ready after {t_teachers - t_start:.0f} s; step {timing.step_s} s, export "
              f"{timing.export_s} s: {timing.epochs} epochs per distillation job", file=sys.stderr)  # fmt: skip

        specs = [{"kind": "distill", "name": f"chaos-{i}", "dataset": dataset, "student": {"arch": "gfl_tiny"},
                  "teacher": {"job": teacher_ids[i % len(teacher_ids)]}, "schedule": schedule(timing.epochs),
                  "seed": i} for i in range(args.jobs)]  # fmt: skip
        submitter = Submitter(stack, watcher, specs, len(stack.workers), token)
        chaos = Chaos(stack, watcher, submitter, rng, args.outage, args.stall, list(args.plan), timing)
        submitter.start()
        disruptions = chaos.run_plan()
        wait_for(chaos.all_done, 1800, "every job to end", 1.0)
        disruptions = sorted(disruptions + chaos.rescues, key=lambda d: d.t)
        time.sleep(1.5)  # a last look by the observers
        submitter.close()
        watcher.close()
        t_end = time.time()
        res = collect(stack, watcher, submitter, disruptions, teacher_ids, args, t_start, t_teachers, t_end)
        res["provenance"] = {**prov, "load": provenance()["load"]}  # the load at the start and now
        res["timing"] = {**asdict(timing), "planned_train_s": timing.planned_train_s()}
        res["settings"].update(epochs=timing.epochs, min_epochs=args.epochs, train_seconds=args.train_seconds)
        return res
    finally:
        if submitter is not None:
            submitter.stop.set()
        watcher.stop.set()
        stack.close()
        if args.keep:
            print(f"chaos: kept {root} and {stack.pg_root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
            subprocess.run(["rm", "-rf", str(stack.pg_root)], check=False)


def measure(stack: Stack, watcher: Watcher, teacher: str, args: argparse.Namespace) -> Timing:
    """Time the first teacher (gfl_tiny, the students' architecture, trained under the same two workers):
    its seconds per step and its export child's lifetime; size the distillation jobs from them."""
    lines = progress_lines(stack, teacher)
    step_s = step_seconds(lines)
    with watcher.lock:
        exports = [c["gone"] - c["first"] for c in watcher.children.values()
                   if c["job"] == teacher and c["what"] == "export" and c["gone"] is not None]  # fmt: skip
    last = lines[-1] if lines else {}
    per_epoch = (last.get("total_iters") or 0) // max(1, last.get("epochs") or 1)
    per_epoch = per_epoch or math.ceil(args.images / BATCH_SIZE)  # no record: what the loader makes of the images
    return Timing(
        step_s=None if step_s is None else round(step_s, 3),
        export_s=round(max(exports), 1) if exports else None,
        per_epoch=per_epoch,
        epochs=size_epochs(step_s, per_epoch, args.train_seconds, args.epochs),
        train_s=args.train_seconds,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--jobs", type=int, default=10, help="distillation jobs (default 10)")
    p.add_argument("--quick", action="store_true", help="2 jobs, one teacher, one kill during training")
    p.add_argument("--plan", help=f"comma-separated disruptions, in order, from {', '.join(KINDS)} "
                   f"(default: {','.join(FULL_PLAN)})")  # fmt: skip
    p.add_argument("--epochs", type=int, default=3, help="the fewest epochs of each distillation job (2 or more)")
    p.add_argument(
        "--train-seconds",
        type=float,
        default=15.0,
        help="training time aimed at per distillation job, from the measured step time (default 15: however "
        "short the steps, seconds of training on either side of a strike, so that a killed job resumes mid-run and "
        "a restarted service finds its jobs still training)",
    )
    p.add_argument("--teacher-epochs", type=int, default=2)
    p.add_argument("--images", type=int, default=24, help="training images (4 per iteration)")
    p.add_argument("--lease", type=float, default=10.0, help="LDD_LEASE_SECONDS of the stack")
    p.add_argument("--outage", type=float, default=3.0, help="seconds Redis and PostgreSQL stay down")
    p.add_argument(
        "--stall",
        type=float,
        default=45.0,
        help="a job queued and a worker idle this long: restart that worker (recorded as a failure)",
    )
    p.add_argument(
        "--storage",
        choices=("auto", "local", "s3"),
        default="auto",
        help="local: one data folder shared by the API and the workers; s3: moto's S3 server and a data folder per "
        "machine (auto: s3 when the plan has machine)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="chaos", help="results name under bench/results/")
    p.add_argument("--keep", action="store_true", help="keep the stack's folders and logs")
    args = p.parse_args(argv)
    if args.quick:
        args.jobs = 2 if args.jobs == 10 else args.jobs
        args.teacher_epochs = 1
        args.epochs = min(args.epochs, 2)
    if args.epochs < 2:
        p.error("--epochs must be 2 or more: the strikes in training come after the first epoch and before the last")
    plan = args.plan.split(",") if args.plan else (["train"] if args.quick else list(FULL_PLAN))
    if unknown := [k for k in plan if k not in KINDS]:
        p.error(f"unknown disruptions {unknown}")
    if args.storage == "auto":
        args.storage = "s3" if MACHINE in plan else "local"
    if MACHINE in plan and args.storage != "s3":
        p.error("the machine disruption needs object storage (--storage s3)")
    args.plan = plan
    res = run(args)
    md = render(res)
    print(md)
    path = save(args.out, res, md)
    print(f"wrote {path}", file=sys.stderr)
    if not verdict(res)[0]:
        return 1
    return 2 if missing_moments(res) else 0


if __name__ == "__main__":
    sys.exit(main())

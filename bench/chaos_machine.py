"""The chaos bench's ``machine`` disruption: a worker machine is lost mid-training (issue 22's object storage).

It needs the ``s3`` layout of ``chaos_stack`` (moto's S3 server, a data folder per worker machine), which the
bench picks whenever the plan has it. The moment is a kill in training's (``Chaos._pick_train``: a target
iteration between the end of the first epoch and the end of the last-but-one, then a random part of an epoch),
once the job's first checkpoint is in the bucket (``runs/<job>/checkpoints/last.pt``). Then the machine
vanishes: its worker's whole process group (the worker, its pool, the training child) is SIGKILLed at once,
and any descendant outside that group right after; the observation files of its runs are kept (``lost/``) and
its data folder is deleted; a replacement worker starts on a new, empty data folder (another machine joining).
Nothing of the job is left on any disk but in the bucket: whichever worker claims it next must fetch the run
and resume from the uploaded checkpoint.

The figures are a worker kill's (``chaos_report.collect``: requeued, claimed, running again, recovery, epochs
repeated) plus ``machine_figures``: which machine resumed it, whether it said it fetched the run from the bucket,
the last iteration ``GET /v1/jobs`` showed before the strike, and whether the machine's newest checkpoint had
been uploaded when it was lost (if not, more than the work since the last checkpoint is trained again).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chaos_figures import fmt, reported_before, stored_models
from chaos_stack import Stack, sql_one
from chaos_watch import Watcher
from servers import descendants, kill_pid, pid_alive, wait_for

if TYPE_CHECKING:
    from chaos_faults import Chaos, Disruption

MACHINE = "machine"
# The report's words (chaos_report.render).
S3_SETUP = (
    " with object storage (moto's S3 server, `LDD_STORAGE_URL=s3://<bucket>/ldd`): each worker and the API on a "
    "data folder of its own, as on machines of their own; models are counted in the bucket"
)
MACHINE_LOST = (
    " A *machine* disruption loses a worker machine: once the job's first checkpoint is in the bucket, the "
    "worker's whole process group is SIGKILLed at once, its data folder deleted (its progress records and logs "
    "kept aside for these figures), and a replacement worker started on a new, empty data folder; the job "
    "resumes wherever it is claimed next, from the checkpoint in the bucket. For a machine, *gone* is until its "
    "processes were gone and its folder deleted."
)


def lose_machine(chaos: Chaos) -> Disruption | None:
    """Strike once a training job's first checkpoint is in the bucket (module docstring); None when every job
    ended first."""
    from chaos_faults import Disruption

    stack = chaos.stack
    if stack.storage != "s3":
        raise RuntimeError("the machine disruption needs object storage (the bench's --storage s3)")
    stored: set[str] = set()

    def pick() -> tuple[str, int, str] | None:
        target = chaos._pick_train()
        if target is None:
            return None
        if target[0] not in stored:
            if not stack.stored_keys(f"runs/{target[0]}/checkpoints/last.pt"):
                return None
            stored.add(target[0])
        return target

    target = chaos.arm(MACHINE, pick, "a lost worker machine during training")
    if target is None:
        return None
    job_id, slot, at = target
    w = stack.workers[slot]
    assert w is not None
    family = descendants(w.pid)
    machine = stack.machine[slot]
    d = Disruption(MACHINE, time.time(), job_id, None, at)
    os.killpg(w.pid, signal.SIGKILL)  # the worker leads its own session: the whole machine at once
    for p in family:  # a descendant that left the group (none expected)
        kill_pid(p)
    w.wait(10)
    chaos.killed.add(job_id)
    state, d.attempt = sql_one(stack, "SELECT state, attempts FROM jobs WHERE id = %s", job_id)
    d.extra["job_state"] = state
    try:
        wait_for(lambda: not any(pid_alive(p) for p in family), 15, "the lost machine's processes to die", 0.02)
        d.extra["orphans"] = 0
    except TimeoutError:
        d.extra["orphans"] = sum(pid_alive(p) for p in family)
    d.extra["checkpoint_uploaded"] = keep_checkpoints(stack, machine, job_id)
    d.extra["kept_files"] = len(stack.lose_machine(slot))
    d.t_back = time.time()
    stack.start_worker(slot, new_machine=True)
    d.extra.update(machine_lost=machine, machine_joined=stack.machine[slot])
    print(f"chaos: machine {machine} lost (worker {slot}, {job_id}, attempt {d.attempt}, {at}); its data folder "
          f"deleted; worker {slot} started on a new machine {stack.machine[slot]}", file=sys.stderr)  # fmt: skip
    if state == "running":
        chaos._settle(lambda: chaos._next_progress_after(job_id, d.t, (d.attempt or 0) + 1))
    return d


def keep_checkpoints(stack: Stack, machine: str, job_id: str) -> bool | None:
    """Keep aside (``lost/<machine>/<job>.{local,bucket}.pt``) the lost machine's newest checkpoint of the job and
    the one in the bucket now; whether they are the same (None: the machine had none)."""
    aside = stack.root / "lost" / machine
    aside.mkdir(parents=True, exist_ok=True)
    stored = stack.stored_bytes(f"runs/{job_id}/checkpoints/last.pt")
    if stored is not None:
        (aside / f"{job_id}.bucket.pt").write_bytes(stored)
    try:
        mine = (stack.machine_dir(machine) / "runs" / job_id / "checkpoints" / "last.pt").read_bytes()
    except OSError:
        return None
    (aside / f"{job_id}.local.pt").write_bytes(mine)
    return stored is not None and hashlib.sha256(stored).digest() == hashlib.sha256(mine).digest()


def checkpoint_iter(path: Path) -> int | None:
    """The training iteration a checkpoint was written at (the bench's own files: read after the run)."""
    if not path.is_file():
        return None
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return int(ckpt["training"]["iteration"])


def machine_figures(stack: Stack, watcher: Watcher, row: dict[str, Any], t_back: float) -> dict[str, Any]:
    """A lost machine's own figures (module docstring), for its row of the report."""
    job = row["job"]
    with watcher.lock:
        later = sorted((c for c in watcher.children.values() if c["job"] == job and c["first"] > t_back),
                       key=lambda c: c["first"])  # fmt: skip
        history = list(watcher.rest.get(job, []))
    logs = "".join(p.read_text(errors="replace") for p in sorted(stack.logs.glob("worker*.log")))
    fetched = re.search(rf"job {job}: (\d+) file\(s\) of the run fetched from (s3://\S+)", logs)
    aside = stack.root / "lost" / str(row.get("machine_lost"))
    return {
        "uploaded_iter": checkpoint_iter(aside / f"{job}.bucket.pt"),
        "local_checkpoint_iter": checkpoint_iter(aside / f"{job}.local.pt"),
        "resumed_on": later[0]["machine"] if later else None,
        "fetched_files": int(fetched.group(1)) if fetched else 0,
        "rest_iter_at_kill": reported_before(history, row["t"]),
    }


def registry_counts(stack: Stack, models: list[tuple[str, str, str]]) -> tuple[dict[str, int], list[str], list[str]]:
    """The published model folders: ``({job: folders}, leftovers, folders no model row points at)``. A row's
    ``key`` is its storage key (``models/<id>``). With the shared folder: the registry's folders, leftovers its
    hidden temporary folders; with s3: the bucket's model folders with their manifest, leftovers those without
    (an upload cut short, never listed or served)."""
    if stack.storage == "s3":
        complete, leftovers = stored_models(stack.stored_keys("models/"))
    else:
        registry = stack.data_dir / "models"
        names = sorted(d.name for d in registry.iterdir()) if registry.is_dir() else []
        complete, leftovers = [n for n in names if not n.startswith(".")], [n for n in names if n.startswith(".")]
    owner = {key: job_id for _id, job_id, key in models}
    folders: dict[str, int] = {}
    for m in complete:
        if (job := owner.get(f"models/{m}")) is not None:
            folders[job] = folders.get(job, 0) + 1
    return folders, leftovers, [m for m in complete if f"models/{m}" not in owner]


def machine_note(r: dict[str, Any]) -> str:
    """The report's note on a lost machine's row."""
    return (
        f"- machine {r.get('machine_lost')} lost with {r['job'][-8:]} at iter {fmt(r.get('at_iter'))} "
        f"({fmt(r.get('rest_iter_at_kill'))} last shown by GET /v1/jobs); its newest checkpoint "
        f"{'was' if r.get('checkpoint_uploaded') else 'was NOT'} in the bucket; {r.get('machine_joined')} "
        f"joined; resumed on {r.get('resumed_on')} from iter {fmt(r.get('resumed_from'))}, "
        f"{r.get('fetched_files')} run file(s) fetched from the bucket; the bucket's checkpoint was of iter "
        f"{fmt(r.get('uploaded_iter'))}, the machine's newest of iter {fmt(r.get('local_checkpoint_iter'))}."
    )


def machine_problems(rows: list[dict[str, Any]]) -> list[str]:
    """The lost machines' invariant (``chaos_report.verdict``): the job resumed from the checkpoint that was in the
    bucket when its machine was lost (not from scratch, nor from anything else)."""
    bad = [r["job"] for r in rows if r["kind"] == MACHINE and r.get("resumed_from") != r.get("uploaded_iter")]
    return (
        [f"lost machines whose job did not resume from the checkpoint in the bucket: {', '.join(bad)}"] if bad else []
    )


def machine_head(rows: list[dict[str, Any]], per_upload: str) -> list[list[str]]:
    """The report's figures on lost machines: epochs repeated, split into what the bucket's checkpoint lagged behind
    the machine's newest one (uploaded at the worker's next heartbeat) and the work since that one."""
    lost = [r for r in rows if r["kind"] == MACHINE]
    if not lost:
        return []
    resumed = sum(r.get("resumed_from") is not None and r.get("resumed_from") == r.get("uploaded_iter") for r in lost)
    lag = [(r["local_checkpoint_iter"] - r["uploaded_iter"]) / r["per_epoch"] for r in lost
           if r.get("local_checkpoint_iter") is not None and r.get("uploaded_iter") is not None]  # fmt: skip
    return [
        ["lost machines whose job resumed from the checkpoint in the bucket", f"{resumed} of {len(lost)}",
         f"{len(lost)} of {len(lost)}"],
        ["epochs repeated per lost machine (max; of which the upload lag)",
         f"{max(r.get('repeated', 0.0) for r in lost):.2f} ({max(lag):.2f})" if lag else
         f"{max(r.get('repeated', 0.0) for r in lost):.2f}", f"<= 1 + {per_upload}"],
    ]  # fmt: skip

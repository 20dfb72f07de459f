"""One job over several processes (``distill.ddp``, issue 13): real ``torchrun`` with 2 gloo processes on the
CPU, against one process with the same global batch.

What may differ between the two, and why the tolerance is 1e-4 relative: each rank runs its convolutions
on 1 image instead of 2 (other kernels, other summation order) and the loss divisors arrive through a gloo
all-reduce; these are float32 rounding differences that the SGD updates carry forward. The batches are the
same (the sampler cuts the one global order into per-rank slices), the images have one size (so no rank pads
differently), and the backbone's batch norm is frozen (``norm_eval``: with batch statistics each rank would
normalise over its own image, a real difference, as in mmdetection without SyncBN).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill.checkpoint import read_checkpoint
from distill.data.dataset import build_loaders, set_epoch
from distill.data.sampler import EpochSampler
from distill.data.synthetic import make_synthetic
from distill.spec import LocalJobSpec
from distill.train import run
from tests.service_fixtures import ROOT, pid_alive, wait_for

pytestmark = pytest.mark.timeout(300)

REL = 1e-4
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("ddp"), num_train=8, num_val=2, image_size=(128, 96), seed=3)


def _spec(data: Path, out: Path, gpus: int, **schedule: object) -> Path:
    """8 images, global batch 2, 3 epochs: 12 steps, a checkpoint after each."""
    spec = {
        "kind": "train",
        "dataset": str(data),
        "student": {"arch": "gfl_tiny", "norm_eval": True},
        "seed": 1,
        "schedule": {
            "epochs": 3,
            "batch_size": 2,
            "image_size": [128, 96],
            "warmup_iters": 2,
            "lr": 0.01,
            "num_workers": 0,
            "checkpoint_every": 1,
            "gpus": gpus,
            **schedule,
        },
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{out.name}.spec.json"
    path.write_text(json.dumps(spec))
    return path


def _launch(spec: Path, out: Path, processes: int, device: str = "cpu") -> subprocess.Popen[bytes]:
    """``python -m distill train`` as the worker starts it: torchrun for 2, in a session of its own."""
    cmd = [
        *(TORCHRUN if processes > 1 else [sys.executable]),
        "-m",
        "distill",
        "train",
        str(spec),
        "--out",
        str(out),
        "--report-every-s",
        "0",
        "--device",
        device,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log = open(out.parent / f"{out.name}.log", "ab")  # noqa: SIM115 (kept by the child)
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _losses(out: Path) -> dict[int, dict[str, float]]:
    """Iteration -> the reported (global) loss terms, last record wins (a resumed run reports again)."""
    records = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    return {r["iter"]: r["losses"] for r in records if r["phase"] == "train" and r["losses"]}


def _close(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]], iters: range, rel: float = REL) -> None:
    for i in iters:
        assert a[i].keys() == b[i].keys(), i
        for k in a[i]:
            assert abs(a[i][k] - b[i][k]) <= rel * abs(b[i][k]) + 2e-5, (i, k, a[i][k], b[i][k])  # + 5-digit rounding


def _processes(out: Path) -> list[int]:
    """Live processes whose command line names the run folder ``out`` (torchrun and its ranks)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes()
            except OSError:
                continue
            if str(out).encode() in cmd and pid_alive(int(d.name)):
                found.append(int(d.name))
    return found


def _ranks(out: Path) -> list[int]:
    return [p for p in _processes(out) if b"torch.distributed.run" not in Path(f"/proc/{p}/cmdline").read_bytes()]


def _wait_iter(out: Path, proc: subprocess.Popen[bytes], at_least: int) -> int:
    def reached() -> int | None:
        if proc.poll() is not None:
            raise AssertionError(f"finished early: {(out.parent / f'{out.name}.log').read_text()[-3000:]}")
        try:
            return max(_losses(out), default=0) >= at_least and max(_losses(out))
        except (OSError, ValueError):
            return None

    return wait_for(reached, 120, f"{out.name} to reach iteration {at_least}", 0.02)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple[dict[int, dict[str, float]], dict[str, torch.Tensor]]:
    """One process, batch 2, in this process: the per-step losses and the final weights."""
    out = tmp_path_factory.mktemp("one") / "run"
    spec = LocalJobSpec.model_validate_json(_spec(data, out, 1).read_text())
    run(spec, out, report_every_s=0)
    return _losses(out), read_checkpoint(out / "model.pt")["state_dict"]


# ------------------------------------------------------------------------------------------------ sampler


def test_rank_shards_are_the_one_process_batches_and_resume_by_global_batch(data) -> None:
    n = 11  # global batch 4 over 2 ranks: two full batches, then 3 images split 1 + 2
    one = EpochSampler(n, seed=5)
    one.set_epoch(3)
    order = list(one)
    shards = [EpochSampler(n, seed=5, batch_size=2, rank=r, world=2) for r in range(2)]
    for s in shards:
        s.set_epoch(3)
    got = [list(s) for s in shards]
    assert [len(g) for g in got] == [len(s) for s in shards] == [5, 6]
    assert got[0][:4] == order[0:2] + order[4:6] and got[1][:4] == order[2:4] + order[6:8]
    assert sorted(got[0][4:] + got[1][4:]) == sorted(order[8:])
    for s in shards:  # resume after 2 global batches: only the last one is left
        s.set_epoch(3, start=8)
    assert sorted(sum((list(s) for s in shards), [])) == sorted(order[8:])

    tail = [EpochSampler(9, seed=5, batch_size=2, rank=r, world=2) for r in range(2)]  # 1 image left for 2 ranks
    for s in tail:
        s.set_epoch(0)
    assert [len(list(s)) for s in tail] == [len(s) for s in tail] == [5, 5]  # the same number of steps

    # Through the loaders, with per-rank batch 1 and a resume at global step 1 of epoch 2.
    def ids(loader) -> list[list[int]]:
        return [[t["image_id"] for t in targets] for _, targets in loader]

    single = build_loaders(data, 0.0, 1, (128, 96), 2, 0)[0]
    ranks = [build_loaders(data, 0.0, 1, (128, 96), 1, 0, rank=r, world=2)[0] for r in range(2)]
    for start in (0, 1):
        for loader in (single, *ranks):
            set_epoch(loader, 2, start)
        assert [a + b for a, b in zip(*map(ids, ranks), strict=True)] == ids(single)


def test_persistent_loader_workers_see_each_new_epoch(data) -> None:
    """The training loader's workers outlive an epoch: its flips must still follow the epoch."""
    plain = build_loaders(data, 0.0, 1, (128, 96), 2, 0)[0]
    persistent = build_loaders(data, 0.0, 1, (128, 96), 2, 1)[0]
    assert persistent.persistent_workers and persistent.num_workers == 1
    for epoch in range(3):
        for loader in (plain, persistent):
            set_epoch(loader, epoch)
        a, b = list(plain), list(persistent)
        assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b, strict=True)), epoch


# --------------------------------------------------------------------------------------------- processes


def test_two_processes_match_one_process_through_a_cancel_and_resume(data, tmp_path, reference) -> None:
    """Loss equivalence, and cancel: SIGTERM to the launcher's process group mid-run, as the worker's
    ``stop_group`` sends it. The ranks agree to stop after the same step, rank 0 checkpoints, every process
    exits; 2 processes resume. Every step's global losses and the final weights match one process's."""
    losses, weights = reference
    out = tmp_path / "two"
    spec = _spec(data, out, 2)
    proc = _launch(spec, out, 2)
    _wait_iter(out, proc, 3)
    family = _processes(out)
    assert len(family) == 3 and len(_ranks(out)) == 2  # torchrun + 2 ranks, each in a session of its own
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(60) != 0
    wait_for(lambda: not any(pid_alive(p) for p in family), 20, "every rank to exit")
    stopped_at = read_checkpoint(out / "checkpoints" / "last.pt")["training"]["iteration"]
    assert 3 <= stopped_at < 12 and not (out / "error.json").exists()  # a stop is no verdict on the job

    resumed = _launch(spec, out, 2)
    assert resumed.wait(240) == 0, (tmp_path / "two.log").read_text()[-3000:]
    assert sorted(_losses(out)) == sorted(losses) == list(range(1, 13))
    _close(_losses(out), losses, range(1, 13))
    mine = read_checkpoint(out / "model.pt")["state_dict"]
    worst = max(float((mine[k].float() - weights[k].float()).abs().max()) for k in weights)
    assert worst < 1e-4, worst
    assert (out / "metrics.json").is_file() and not (out / "error.json").exists()


def test_killed_rank_ends_the_group_then_resume_with_one(data, tmp_path, reference) -> None:
    """SIGKILL one rank mid-run: the other does not hang (its collective fails, torchrun stops it), no
    verdict is written (the worker retries the attempt), and one process resumes the 2-process checkpoint."""
    out = tmp_path / "killed"
    spec = _spec(data, out, 2)
    proc = _launch(spec, out, 2)
    _wait_iter(out, proc, 3)
    family = _processes(out)
    victim = max(_ranks(out))
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    assert proc.wait(60) != 0
    wait_for(lambda: not any(pid_alive(p) for p in family), 20, "every process to exit")
    assert time.monotonic() - t0 < 45
    assert not (out / "error.json").exists()
    done = read_checkpoint(out / "checkpoints" / "last.pt")["training"]["iteration"]
    assert 3 <= done < 12

    # The same spec (gpus: 2) run by one process, here: world size 1, batch 2, from the 2-process checkpoint.
    run(LocalJobSpec.model_validate_json(spec.read_text()), out, report_every_s=0)
    _close(_losses(out), reference[0], range(done + 1, 13))


HANG = """
import sys, time, torch
from distill import ddp
ddp.setup("cpu")
if ddp.rank() == 1:
    time.sleep(120)  # alive, connected, never joins the collective
t0 = time.monotonic()
try:
    ddp.all_mean(torch.ones(1))
except ddp.GroupLost as e:
    print(f"TIMEOUT after {time.monotonic() - t0:.1f} s: {type(e).__name__}", flush=True)
    sys.exit(1)
"""


def test_collective_timeout_ends_a_hung_group(tmp_path) -> None:
    """A rank that hangs without dying (stuck I/O, a stopped process) is caught by the group's collective
    timeout (``LDD_DDP_TIMEOUT_S``): the waiting rank fails, torchrun stops the hung one."""
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    log = tmp_path / "hang.log"
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.run(
            [*TORCHRUN, str(script)],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "LDD_DDP_TIMEOUT_S": "3"},
            timeout=100,
        )
    text = log.read_text()
    assert proc.returncode != 0 and "TIMEOUT after" in text, text[-3000:]
    waited = float(text.split("TIMEOUT after ")[1].split(" s")[0])
    assert 2.5 <= waited < 30, waited
    assert time.monotonic() - t0 < 90  # not the sleeping rank's 120 s


# ------------------------------------------------------------------------------------------- the service


@pytest.mark.slow
def test_worker_runs_and_cancels_two_process_jobs(tmp_path) -> None:
    """A real worker (embedded broker, SQLite store) runs ``schedule.gpus: 2`` jobs under torchrun: a cancel
    ends the launcher and both ranks; a killed rank makes the attempt retry, and the next one resumes,
    exports and publishes the model."""
    from tests.service_fixtures import DATASET, IMAGE_SIZE, Service, train_spec, training_children

    dataset = make_synthetic(
        tmp_path / "synthetic", num_train=8, num_val=2, image_size=IMAGE_SIZE, num_classes=2, seed=0
    )
    service = Service(tmp_path, "filesystem://", dataset, LDD_WORKER_GPUS="2")  # a worker for 2-process jobs
    try:
        worker = service.start_worker()
        cancelled = service.submit(train_spec(DATASET, epochs=50, gpus=2))
        service.wait_training(cancelled, min_iter=1, timeout=120)
        family = training_children(worker)
        assert len(family) == 3, service.logs()  # torchrun and its 2 ranks
        assert service.store.request_cancel(cancelled)["cancel_requested"]
        assert service.wait_end(cancelled, timeout=30)["state"] == "cancelled"
        wait_for(lambda: not any(pid_alive(p) for p in family), 10, "every rank to exit")

        # A rank killed mid-run (the OOM killer): the attempt ends without a verdict and is retried; the next
        # attempt resumes from the epoch checkpoint and publishes.
        job_id = service.submit(train_spec(DATASET, epochs=3, gpus=2))  # 8 images, batch 4: 6 iterations
        service.wait_training(job_id, min_iter=3, timeout=120)
        ranks = [
            p
            for p in training_children(worker)
            if b"torch.distributed.run" not in Path(f"/proc/{p}/cmdline").read_bytes()
        ]
        assert len(ranks) == 2, service.logs()
        os.kill(ranks[1], signal.SIGKILL)
        done = service.wait_end(job_id, timeout=240)
        assert done["state"] == "succeeded" and done["model_id"], f"{done}\n{service.logs()}"
        assert done["attempts"] == 2 and "training process exited with code 1" in done["last_error"], done
        assert done["metrics"]["resumed_from_iter"] >= 2 and done["metrics"]["iterations"] == 6
    finally:
        service.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_gpus_match_one_gpu(data, tmp_path) -> None:
    """The same over NCCL, one GPU per rank (``scripts/gpu_check.sh`` runs it where a machine has 2 GPUs).
    Looser (1e-2): cuDNN picks other (TF32) convolution algorithms for 1 image than for 2; amp off."""
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"gpu{n}"
        proc = _launch(_spec(data, out, n, amp=False), out, n, device="cuda")
        assert proc.wait(300) == 0, (tmp_path / f"gpu{n}.log").read_text()[-3000:]
        runs[n] = _losses(out)
    _close(runs[2], runs[1], range(1, 13), rel=1e-2)


# ------------------------------------------------------------------------------------------- distillation

DISTILL_SETUPS = {
    # LD's default with BCKD beside it, the teacher's outputs from the cache (filled in epoch 1, read in 2).
    "ld_bckd_cached": {"weights": {"bckd_cls": 8.0, "bckd_loc": 2.0}, "teacher_cache": "on"},
    # CrossKD: the alignment statistics are the global batch's (all-reduced), not each rank's.
    "crosskd": {"method": "crosskd", "teacher_cache": "off"},
}


@pytest.mark.parametrize("setup", sorted(DISTILL_SETUPS))
def test_distillation_over_two_processes_matches_one(data, tmp_path, setup) -> None:
    """Issue 21: LD + VLR + KD with the teacher cache (and BCKD), and CrossKD, under two gloo processes give
    the one-process run's global losses at every step and its final weights."""
    from distill.checkpoint import atomic_save, build_detector, detector_state
    from distill.data.annotations import load_coco

    torch.manual_seed(7)
    classes = load_coco(data, check_images=False).classes
    teacher = tmp_path / "teacher.pt"
    atomic_save(detector_state(build_detector("gfl_tiny", len(classes), classes)), teacher)
    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"p{processes}"
        path = _spec(data, out, processes, epochs=2)
        spec = json.loads(path.read_text())
        spec.update(kind="distill", teacher={"path": str(teacher)}, distill=DISTILL_SETUPS[setup])
        path.write_text(json.dumps(spec))
        assert _launch(path, out, processes).wait(240) == 0, (tmp_path / f"p{processes}.log").read_text()[-3000:]
        runs[processes] = out
    one, two = _losses(runs[1]), _losses(runs[2])
    assert sorted(one) == sorted(two) == list(range(1, 9))
    terms = {"main_ld", "vlr_ld", "main_kd", "bckd_cls", "bckd_loc"} if setup != "crosskd" else {"crosskd_cls"}
    assert terms <= set(one[8]), one[8]
    _close(two, one, range(1, 9))
    if setup == "ld_bckd_cached":
        cache = json.loads((runs[2] / "metrics.json").read_text())["teacher_cache"]
        # Epoch 2 read the cache (a pair flipped the same way as in epoch 1), and nothing was stored twice.
        assert cache["hit_rate"] > 0 and cache["entries"] <= 2 * 8, cache
    w1, w2 = (read_checkpoint(r / "model.pt")["state_dict"] for r in (runs[1], runs[2]))
    worst = max(float((w2[k].float() - w1[k].float()).abs().max()) for k in w1)
    assert worst < 1e-4, worst

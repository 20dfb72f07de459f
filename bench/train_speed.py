"""Training-step speed of a GFL student: images/s and where a step's time goes; and one job over N processes.

    python bench/train_speed.py [--arch gfl_r18] [--size 512 320] [--batch 2] [--iters 10] [--device cpu]
                                [--workers 0 auto] [--ddp 1 2]

Phases of one step (timed with device synchronisation): data wait (the time the step waits for its next
batch from the DataLoader, and its copy to the device: with loader workers, only what they have not prepared
in advance), forward (backbone, FPN, head), assignment (ATSS), loss (QFL, GIoU, DFL) and backward +
optimiser step. One row per ``--workers`` setting (``auto``: the training default,
``distill.data.dataset.default_workers``; pinned memory on CUDA, persistent workers, prefetch 2).

``--ddp N ...``: the same model trained by ``python -m distill train`` under ``torchrun`` with N processes
(NCCL on GPUs, gloo on the CPU), ``--batch`` images per process; images/s from the job's own progress
records after its first one (start-up left out), in total and per process.

Prints the tables and writes ``bench/results/train_speed_<device>.json|md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from report import device_tag, save

from distill.assigners import atss_assign
from distill.data.dataset import default_workers
from distill.data.synthetic import make_synthetic
from distill.losses.gfl import find_positives, gfl_losses
from distill.outputs import pad_targets
from distill.spec import LocalJobSpec
from distill.train import Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    arch: str, size: tuple[int, int], batch: int, iters: int, warmup: int, device: str, workers: int | None
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_synthetic(
            Path(tmp) / "data", num_train=batch * (iters + warmup), num_val=2, image_size=size, seed=0
        )
        spec = LocalJobSpec.model_validate(
            {
                "kind": "train",
                "dataset": str(data_dir),
                "student": {"arch": arch},
                "schedule": {
                    "epochs": 1,
                    "batch_size": batch,
                    "image_size": list(size),
                    "num_workers": workers,
                    "warmup_iters": 0,
                },
            }
        )
        trainer = Trainer(spec, Path(tmp) / "run", device=device)
        dev = trainer.device
        model = trainer.model.train()
        criterion = trainer.criterion  # its phases are timed one by one here, as Trainer.step runs them
        loader = iter(trainer.train_loader)
        phases = {"data": 0.0, "forward": 0.0, "assign": 0.0, "loss": 0.0, "backward": 0.0}
        images_done = 0
        for i in range(warmup + iters):
            t0 = time.perf_counter()
            images, targets = next(loader)
            images = images.to(dev, non_blocking=True)  # as the trainer: asynchronous from pinned memory
            gt = pad_targets(targets, dev)
            _sync(dev)
            t1 = time.perf_counter()
            out = criterion.forward(images)
            loc = criterion.locations(out.sizes, dev)
            _sync(dev)
            t2 = time.perf_counter()
            with torch.no_grad():
                assignment = atss_assign(loc.anchors, loc.counts, gt.boxes, gt.valid)
            _sync(dev)
            t3 = time.perf_counter()
            pos = find_positives(out.reg, loc.points, loc.strides, assignment, gt.boxes, model.bbox_head.integral)
            losses = gfl_losses(out.cls, pos, gt.labels, criterion.weights)
            total = sum(losses.values())
            _sync(dev)
            t4 = time.perf_counter()
            trainer.optimizer.zero_grad(set_to_none=True)
            total.backward()
            trainer.optimizer.step()
            _sync(dev)
            t5 = time.perf_counter()
            if i >= warmup:
                for name, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
                    phases[name] += dt
                images_done += images.shape[0]
        step_total = sum(phases.values())
        return {
            "arch": arch,
            "image_size": list(size),
            "batch": batch,
            "iters": iters,
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "amp": trainer.amp,
            "workers": trainer.train_loader.num_workers,
            "pin_memory": trainer.train_loader.pin_memory,
            "persistent_workers": trainer.train_loader.persistent_workers,
            "images_per_s": images_done / step_total,
            "step_ms": 1000 * step_total / iters,
            "share": {k: v / step_total for k, v in phases.items()},
        }


def measure_ddp(arch: str, size: tuple[int, int], batch: int, iters: int, device: str, processes: int) -> dict:
    """Images/s of a real job (``python -m distill train``, under torchrun when ``processes`` > 1), from its
    progress records: (iterations x global batch) / seconds between the first record and the last."""
    global_batch = batch * processes
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_synthetic(
            Path(tmp) / "data", num_train=global_batch * iters, num_val=2, image_size=size, seed=0
        )
        spec = {
            "kind": "train",
            "dataset": str(data_dir),
            "student": {"arch": arch},
            "val_split": 0.0,
            "schedule": {
                "epochs": 1,
                "batch_size": global_batch,
                "image_size": list(size),
                "warmup_iters": 0,
                "gpus": processes,
            },
        }
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        launcher = (
            ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 else []
        )
        cmd = [
            sys.executable,
            *launcher,
            "-m",
            "distill",
            "train",
            str(Path(tmp) / "spec.json"),
            "--out",
            str(Path(tmp) / "run"),
            "--device",
            device,
            "--report-every-s",
            "0",
        ]
        root = str(Path(__file__).resolve().parents[1])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        started = time.monotonic()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        records = [json.loads(line) for line in (Path(tmp) / "run" / "progress.jsonl").read_text().splitlines()]
        steps = [r for r in records if r["phase"] == "train" and r["iter"] > 0]
        first, last = steps[0], steps[-1]
        rate = (last["iter"] - first["iter"]) * global_batch / max(last["time"] - first["time"], 1e-9)
        return {
            "processes": processes,
            "batch_per_process": batch,
            "global_batch": global_batch,
            "iters": last["iter"] - first["iter"],
            "images_per_s": rate,
            "per_process": rate / processes,
            "job_seconds": round(time.monotonic() - started, 1),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="gfl_r18")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 320), metavar=("LONG", "SHORT"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--workers",
        nargs="+",
        default=["0", "auto"],
        help="loader workers per row: numbers, or auto (the training default)",
    )
    parser.add_argument(
        "--ddp",
        type=int,
        nargs="*",
        default=[],
        metavar="N",
        help="also train the job with N processes (torchrun) and report images/s per process",
    )
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    rows = [
        measure(
            args.arch,
            tuple(args.size),
            args.batch,
            args.iters,
            args.warmup,
            args.device,
            None if w == "auto" else int(w),
        )
        for w in args.workers
    ]
    r = rows[0]
    lines = [
        f"# Training step speed: {r['arch']} at {r['image_size'][0]}x{r['image_size'][1]}, batch {r['batch']}",
        "",
        f"device: {r['device']} ({r['device_name']}), torch {r['torch']}, threads {r['threads']}, amp {r['amp']}, "
        f"{os.cpu_count()} CPUs (auto = {default_workers()} loader workers)",
        "",
        "| loader workers | pinned | images/s | step (ms) | data wait | forward | assignment | loss | backward+step |",
        "|---:|:---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {'yes' if r['pin_memory'] else 'no'} | {r['images_per_s']:.2f} | "
            f"{r['step_ms']:.0f} | "
            + " | ".join(f"{100 * r['share'][k]:.1f}%" for k in ("data", "forward", "assign", "loss", "backward"))
            + " |"
        )
    ddp = [measure_ddp(args.arch, tuple(args.size), args.batch, max(args.iters, 4), args.device, n) for n in args.ddp]
    if ddp:
        lines += [
            "",
            f"One job over N processes (torchrun; {args.batch} images per process, default loader settings):",
            "",
            "| processes | global batch | images/s | images/s per process | scaling |",
            "|---:|---:|---:|---:|---:|",
        ]
        for d in ddp:
            lines.append(
                f"| {d['processes']} | {d['global_batch']} | {d['images_per_s']:.2f} | "
                f"{d['per_process']:.2f} | {d['per_process'] / ddp[0]['per_process']:.2f} |"
            )
    print("\n".join(lines))
    save(f"train_speed_{device_tag(rows[0]['device'])}", {"rows": rows, "ddp": ddp}, "\n".join(lines))


if __name__ == "__main__":
    main()

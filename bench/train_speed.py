"""Training-step speed of a GFL student: images/s and where a step's time goes.

    python bench/train_speed.py [--arch gfl_r18] [--size 512 320] [--batch 2] [--iters 10] [--device cpu]

Phases of one step (timed with device synchronisation): data loading (next batch from the DataLoader),
forward (backbone, FPN, head), assignment (ATSS), loss (QFL, GIoU, DFL) and backward + optimiser step.
Prints a table and writes ``bench/results/train_speed_<device>.json|md``.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch
from report import device_tag, save

from distill.assigners import atss_assign
from distill.criterion import pad_targets
from distill.data.synthetic import make_synthetic
from distill.losses.gfl import find_positives, gfl_losses
from distill.spec import LocalJobSpec
from distill.train import Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(arch: str, size: tuple[int, int], batch: int, iters: int, warmup: int, device: str,
            workers: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_synthetic(Path(tmp) / "data", num_train=batch * (iters + warmup), num_val=2,
                                  image_size=size, seed=0)
        spec = LocalJobSpec.model_validate({
            "kind": "train", "dataset": str(data_dir), "student": {"arch": arch},
            "schedule": {"epochs": 1, "batch_size": batch, "image_size": list(size), "num_workers": workers,
                         "warmup_iters": 0}})
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
            images = images.to(dev)
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
            "arch": arch, "image_size": list(size), "batch": batch, "iters": iters, "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "amp": trainer.amp,
            "images_per_s": images_done / step_total, "step_ms": 1000 * step_total / iters,
            "share": {k: v / step_total for k, v in phases.items()},
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="gfl_r18")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 320), metavar=("LONG", "SHORT"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    r = measure(args.arch, tuple(args.size), args.batch, args.iters, args.warmup, args.device, args.workers)
    lines = [
        f"# Training step speed: {r['arch']} at {r['image_size'][0]}x{r['image_size'][1]}, batch {r['batch']}",
        "",
        f"device: {r['device']} ({r['device_name']}), torch {r['torch']}, threads {r['threads']}, amp {r['amp']}",
        "",
        "| images/s | step (ms) | data | forward | assignment | loss | backward+step |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['images_per_s']:.2f} | {r['step_ms']:.0f} | "
        + " | ".join(f"{100 * r['share'][k]:.1f}%" for k in ("data", "forward", "assign", "loss", "backward"))
        + " |",
    ]
    print("\n".join(lines))
    save(f"train_speed_{device_tag(r['device'])}", r, "\n".join(lines))


if __name__ == "__main__":
    main()

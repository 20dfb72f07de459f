"""Cost of a distillation step against a student step plus a teacher forward pass, and the share of the
distillation step spent finding the regions (Main + VLR).

    python bench/distill_speed.py [--student gfl_r18] [--teacher gfl_r34] [--size 512 320] [--batch 2]
                                  [--iters 6] [--device cpu] [--threads N]

Both steps are the training loop's own (``Trainer.step`` + backward + optimiser step) on the same batches;
the teacher forward pass is timed as the loop runs it (eval mode, ``no_grad``, autocast on GPU). The three
are timed in turn on each batch, so load from other processes hits them alike; medians are reported.
Targets (DESIGN section 7): ``distill / (student + teacher) <= 1.10`` and regions < 5% of the step.
Prints a table and writes ``bench/results/distill_speed_<device>.json|md``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from report import device_tag, save

from distill.checkpoint import atomic_save, build_detector, detector_state
from distill.criterion import DistillCriterion, pad_targets
from distill.data.synthetic import make_synthetic
from distill.spec import LocalJobSpec
from distill.train import Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _train_step(trainer: Trainer, images: torch.Tensor, targets: list[dict]) -> None:
    step = trainer.step(images, targets)
    trainer.optimizer.zero_grad(set_to_none=True)
    step.total.backward()
    trainer.optimizer.step()


def measure(student: str, teacher: str, size: tuple[int, int], batch: int, iters: int, warmup: int,
            device: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        data_dir = make_synthetic(tmp_path / "data", num_train=batch * (iters + warmup), num_val=2,
                                  image_size=size, seed=0)
        classes = [str(d) for d in range(10)]
        teacher_path = tmp_path / "teacher.pt"
        atomic_save(detector_state(build_detector(teacher, len(classes), classes)), teacher_path)
        schedule = {"epochs": 1, "batch_size": batch, "image_size": list(size), "num_workers": 0,
                    "warmup_iters": 0}
        base = {"dataset": str(data_dir), "student": {"arch": student}, "schedule": schedule}
        plain = Trainer(LocalJobSpec.model_validate({"kind": "train", **base}), tmp_path / "plain", device=device)
        spec = LocalJobSpec.model_validate({"kind": "distill", **base, "teacher": {"path": str(teacher_path)}})
        distilled = Trainer(spec, tmp_path / "distill", device=device)
        dev = distilled.device
        criterion = distilled.criterion
        assert isinstance(criterion, DistillCriterion)
        plain.model.train()
        distilled.model.train()

        def teacher_forward(images: torch.Tensor) -> None:
            criterion.teacher_forward(images)

        def regions(images: torch.Tensor, targets: list[dict]) -> tuple[float, int, int]:
            with torch.no_grad():
                gt = pad_targets(targets, dev)
                _, state = criterion.gfl.losses(criterion.gfl.forward(images), gt)
                found = []
                elapsed = _timed(lambda: found.append(criterion.regions(state, gt)), dev)
                return elapsed, int(found[0].main.sum()), int(found[0].vlr.sum())

        times: dict[str, list[float]] = {"student": [], "teacher": [], "distill": [], "regions": []}
        sizes = {"main": [], "vlr": []}
        for i, (images, targets) in enumerate(distilled.train_loader):
            images = images.to(dev)
            sample = {
                "student": _timed(lambda: _train_step(plain, images, targets), dev),  # noqa: B023
                "teacher": _timed(lambda: teacher_forward(images), dev),  # noqa: B023
                "distill": _timed(lambda: _train_step(distilled, images, targets), dev),  # noqa: B023
            }
            sample["regions"], n_main, n_vlr = regions(images, targets)
            if i >= warmup:
                for k, v in sample.items():
                    times[k].append(v)
                sizes["main"].append(n_main)
                sizes["vlr"].append(n_vlr)
            if i + 1 >= warmup + iters:
                break
        med = {k: statistics.median(v) for k, v in times.items()}
        return {
            "student": student, "teacher": teacher, "image_size": list(size), "batch": batch, "iters": iters,
            "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "amp": distilled.amp,
            "median_ms": {k: 1000 * v for k, v in med.items()},
            "ratio": med["distill"] / (med["student"] + med["teacher"]),
            "regions_share": med["regions"] / med["distill"],
            "locations_per_batch": {k: statistics.mean(v) for k, v in sizes.items()},
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="gfl_r18")
    parser.add_argument("--teacher", default="gfl_r34")
    parser.add_argument("--size", type=int, nargs=2, default=(512, 320), metavar=("LONG", "SHORT"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args.student, args.teacher, tuple(args.size), args.batch, args.iters, args.warmup, args.device)
    ms = r["median_ms"]
    lines = [
        f"# Distillation step cost: {r['student']} from {r['teacher']} at {r['image_size'][0]}x{r['image_size'][1]}, "
        f"batch {r['batch']}",
        "",
        f"device: {r['device']} ({r['device_name']}), torch {r['torch']}, threads {r['threads']}, amp {r['amp']}; "
        f"medians of {r['iters']} steps",
        "",
        "| student step (ms) | teacher forward (ms) | distill step (ms) | distill / (student + teacher) | "
        "regions (ms) | regions share of the step |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {ms['student']:.1f} | {ms['teacher']:.1f} | {ms['distill']:.1f} | {r['ratio']:.3f} "
        f"(target <= 1.10) | {ms['regions']:.2f} | {100 * r['regions_share']:.2f}% (target < 5%) |",
    ]
    print("\n".join(lines))
    save(f"distill_speed_{device_tag(r['device'])}", r, "\n".join(lines))


if __name__ == "__main__":
    main()

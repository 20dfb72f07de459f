"""The training loop of one job: a student of any detector family trained alone (``kind: train``) or
distilled from a frozen teacher (``kind: distill``), with exact resume from checkpoints, progress reports and
COCO evaluation.

Run layout (``out_dir``)::

    checkpoints/last.pt   model + optimiser + position + RNG states + the run's fingerprint (atomic;
                          resumed from automatically, but only by the same job: see ``run_fingerprint``)
    model.pt              the final detector (``distill.load_detector`` reads it)
    metrics.json          COCO metrics (+ distillation diagnostics)
    progress.json(l)      latest progress / its history; train.log: human-readable log

One job over several processes (``torchrun``, :mod:`distill.ddp`): each rank trains on its slice of every
global batch with the same weights; rank 0 alone writes all of the above, and evaluates.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from distill import ddp
from distill.checkpoint import atomic_save, build_detector, detector_state, load_detector, read_checkpoint
from distill.class_map import ClassMap, ClassMapError, map_classes
from distill.criterion import DistillCriterion
from distill.data.dataset import DetectionDataset, build_loaders, collate, set_epoch
from distill.data.images import MEAN, STD
from distill.diagnostics import diagnostics
from distill.evaluate import coco_ap, predict_dataset
from distill.files import atomic_write_json, ensure_room
from distill.init import initialise
from distill.logit_maps import figure5
from distill.models.gfl import GFL
from distill.models.spread_teacher import spread_teacher
from distill.run_state import differences, rng_state, run_fingerprint, seed_everything, set_rng_state
from distill.spec import JobSpec, LocalJobSpec
from distill.task_criteria import TaskCriterion, task_criterion
from distill.teacher import TeacherMismatch, check_teacher
from distill.teacher_cache import CacheOff, CacheRefused, TeacherCache, attach

Progress = Callable[[dict[str, Any]], None]


class TrainingError(RuntimeError):
    """A job that cannot go on (diverged, bad data, bad teacher); its message is shown to the user."""


class Stopped(RuntimeError):
    """SIGTERM/SIGINT arrived; a checkpoint was written."""


# ----------------------------------------------------------------------------------------------- step


@dataclass
class Step:
    """The weighted loss terms of one batch and their sum."""

    losses: dict[str, Tensor]
    total: Tensor


# Warm-up takes at most this share of a run: mmdetection's 500 iterations are 0.6% of a COCO 1x schedule, but
# all of a 12-epoch job on 200 photos at batch 16 (156 iterations), whose learning rate would never arrive.
WARMUP_CAP = 0.25


def warmup_iters(spec: JobSpec, per_epoch: int) -> tuple[int, str | None]:
    """The warm-up the run uses and, when it is shorter than ``schedule.warmup_iters``, why: at most
    ``WARMUP_CAP`` of the run's iterations, and over before the first step decay."""
    s = spec.schedule
    total = s.epochs * per_epoch
    cap = max(1, math.ceil(WARMUP_CAP * total))
    first_step = min(s.lr_steps) * per_epoch
    used = min(s.warmup_iters, cap, max(1, first_step))
    if used == s.warmup_iters:
        return used, None
    why = f"warm-up {s.warmup_iters} iterations capped to {used}: "
    if used == cap:
        return used, why + f"at most {WARMUP_CAP:.0%} of the run's {total} iterations"
    return used, why + f"over before the first learning-rate step at iteration {first_step}"


def learning_rate(spec: JobSpec, iteration: int, per_epoch: int) -> float:
    """Linear warm-up from ``warmup_ratio`` over :func:`warmup_iters`, then x0.1 at each step epoch."""
    s = spec.schedule
    lr = s.base_lr * 0.1 ** sum(iteration >= e * per_epoch for e in s.lr_steps)
    warmup, _ = warmup_iters(spec, per_epoch)
    if iteration < warmup:
        lr *= 1 - (1 - s.warmup_ratio) * (1 - iteration / warmup)
    return lr


class Trainer:
    def __init__(
        self,
        spec: LocalJobSpec,
        out_dir: str | os.PathLike,
        progress: Progress | None = None,
        device: str | torch.device | None = None,
        report_every_s: float = 2.0,
        weights_dir: str | os.PathLike | None = None,
        min_free_bytes: int = 0,
    ):
        self.spec, self.out = spec, Path(out_dir)
        self.report_every_s = report_every_s
        self.out.mkdir(parents=True, exist_ok=True)
        self.progress_cb = progress
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.amp = spec.schedule.amp and self.device.type == "cuda"
        self.stop_requested = False
        self.min_free_bytes = min_free_bytes  # checked before each checkpoint write (distill.files.ensure_room)
        self._log = open(self.out / "train.log", "a", buffering=1)  # noqa: SIM115 (lives with the trainer)

        s = spec.schedule
        self.train_loader, self.val_loader, self.data = build_loaders(
            spec.dataset,
            spec.val_split,
            spec.seed,
            s.image_size,
            ddp.local_batch(s.batch_size),
            s.num_workers,
            scales=s.scales,
            rank=ddp.rank(),
            world=ddp.world(),
            pin_memory=self.device.type == "cuda",
            split_seed=spec.split_seed,
        )
        for problem in self.data.problems:
            self.log(f"dataset: {problem}")
        self.val_ids = list(self.val_loader.dataset.image_ids)
        if not self.val_ids:  # no validation split at all: report training-set AP rather than nothing
            self.val_loader = self.train_loader_for_eval()
            self.val_ids = list(self.val_loader.dataset.image_ids)
        self.per_epoch = len(self.train_loader)
        self.total_iters = self.per_epoch * spec.schedule.epochs
        self.warmup, capped = warmup_iters(spec, self.per_epoch)
        if capped:
            self.log(capped)

        seed_everything(spec.seed)
        self.model = build_detector(
            spec.student.arch,
            len(self.data.classes),
            self.data.classes,
            frozen_stages=spec.student.backbone_frozen_stages,
            norm_eval=spec.student.backbone_norm_eval,
        )
        self.init_report = initialise(self.model, spec.student.init, weights_dir)
        self.log(f"init: {self.init_report.summary()}")
        self.model.to(self.device)
        self.teacher: GFL | None = None
        # The criterion owns the losses: assigner, anchors, weights (spec.loss), and for a distillation the
        # teacher's forward pass, regions, class map and distillation terms.
        self.criterion: TaskCriterion | DistillCriterion = task_criterion(self.model, spec.loss, self.amp)
        if spec.kind == "distill":
            assert spec.teacher is not None and spec.distill is not None
            # DistillCriterion freezes it; a standard-form mmdetection teacher spreads its boxes over our bins.
            self.teacher = spread_teacher(load_detector(spec.teacher.path, self.device), self.model.reg_max)
            try:
                check_teacher(self.teacher, self.model, spec.distill)
            except TeacherMismatch as e:
                raise TrainingError(str(e)) from e
            self.criterion = self._distill_criterion(self.teacher)
        self.adapters: nn.Module | None = self.criterion.adapters  # FitNets' regressors: trained, checkpointed
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.adapters is not None:
            self.params += list(self.adapters.parameters())
        self.optimizer = torch.optim.SGD(self.params, lr=spec.schedule.base_lr, momentum=0.9, weight_decay=1e-4)
        self.iteration = 0
        self.resumed_from: int | None = None
        self.fingerprint = run_fingerprint(spec, self.data.fingerprint())
        # Teacher cache (issue 13): answers the criterion's teacher pass from the run folder where it can.
        self.teacher_cache: TeacherCache | CacheOff | None = None
        if isinstance(self.criterion, DistillCriterion):
            try:
                self.teacher_cache = attach(
                    self.criterion, spec, self.out / "teacher_cache", self.fingerprint, self.log, min_free_bytes
                )
            except CacheRefused as e:
                raise TrainingError(str(e)) from e

    def _distill_criterion(self, teacher: GFL) -> DistillCriterion:
        """The distillation criterion, with KD's class correspondence (logged, and kept for metrics.json)."""
        distill = self.spec.distill
        assert distill is not None
        try:
            classes = map_classes(self.data.classes, teacher.classes, distill.class_map)
        except ClassMapError as e:
            raise TrainingError(str(e)) from e
        criterion = DistillCriterion(self.criterion, teacher, distill, classes)
        report = criterion.class_report()
        self.log(
            f"KD classes (by {report['by']}): {report['mapping']}; without a teacher class: "
            f"{report['unmapped']}; KD {report['kd']}"
        )
        return criterion

    # -- bookkeeping

    def log(self, line: str) -> None:
        if not ddp.is_main():  # rank 0 alone logs, reports and checkpoints (one job over several processes)
            return
        self._log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def report(
        self, phase: str, losses: dict[str, float] | None = None, images_per_s: float = 0.0, eta_s: float | None = None
    ) -> None:
        if not ddp.is_main():
            return
        state = {
            "phase": phase,
            "epoch": min(self.iteration // self.per_epoch + 1, self.spec.schedule.epochs),
            "epochs": self.spec.schedule.epochs,
            "iter": self.iteration,
            "total_iters": self.total_iters,
            "losses": losses or {},
            "images_per_s": round(images_per_s, 3),
            "eta_s": None if eta_s is None else round(eta_s, 1),
            "resumed_from_iter": self.resumed_from,
            "lr": self.optimizer.param_groups[0]["lr"],
            "time": time.time(),
        }
        atomic_write_json(self.out / "progress.json", state)
        with open(self.out / "progress.jsonl", "a") as f:
            f.write(json.dumps(state) + "\n")
        if self.progress_cb:
            self.progress_cb(state)

    def checkpoint_path(self) -> Path:
        return self.out / "checkpoints" / "last.pt"

    def save_checkpoint(self) -> None:
        if not ddp.is_main():
            return
        ckpt = detector_state(self.model, self.meta())
        ckpt["training"] = {
            "fingerprint": self.fingerprint,
            "iteration": self.iteration,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": {"kind": "warmup+step", "iteration": self.iteration},  # lr is a function of iteration
            "adapters": None if self.adapters is None else self.adapters.state_dict(),
            "rng": rng_state(),
        }
        ensure_room(self.checkpoint_path().parent, self.min_free_bytes, "a checkpoint")
        atomic_save(ckpt, self.checkpoint_path())

    def try_resume(self) -> None:
        path = self.checkpoint_path()
        if not path.exists():
            return
        ckpt = read_checkpoint(path)
        training = ckpt["training"]
        if (theirs := training.get("fingerprint")) is not None and theirs != self.fingerprint:
            # Resuming another job's weights would silently mix two runs: refuse, and say what differs.
            differs = ", ".join(differences(theirs, self.fingerprint)) or "?"
            raise TrainingError(
                f"{self.out} holds a checkpoint of a different run (differs in: {differs}); "
                f"use another output folder, or delete {path} to start this run afresh"
            )
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(training["optimizer"])
        if self.adapters is not None and training.get("adapters") is not None:
            self.adapters.load_state_dict(training["adapters"])
        self.iteration = self.resumed_from = int(training["iteration"])
        set_rng_state(training["rng"])
        self.log(f"resumed from {path} at iteration {self.iteration}")

    def meta(self) -> dict[str, Any]:
        return {
            "input_size": list(self.spec.schedule.image_size),
            "mean": list(MEAN),
            "std": list(STD),
            "classes": self.data.classes,
            "kind": self.spec.kind,
            "name": self.spec.name,
            "seed": self.spec.seed,
        }

    # -- training

    def step(self, images: Tensor, targets: list[dict]) -> Step:
        """The weighted loss terms of a batch (``images (B, 3, H, W)`` on the device) and their sum."""
        losses = self.criterion(images, targets)
        return Step(losses, sum(losses.values(), torch.zeros((), device=self.device)))

    def train(self) -> None:
        s = self.spec.schedule
        self.model.train()
        window_start, window_images = time.monotonic(), 0
        last_report = 0.0
        while self.iteration < self.total_iters:
            epoch = self.iteration // self.per_epoch
            set_epoch(self.train_loader, epoch, self.iteration - epoch * self.per_epoch)
            for images, targets in self.train_loader:
                for group in self.optimizer.param_groups:
                    group["lr"] = learning_rate(self.spec, self.iteration, self.per_epoch)
                images = images.to(self.device, non_blocking=True)
                step = self.step(images, targets)
                # The global batch's terms (the mean of the ranks'): what is reported, and one verdict for all.
                means = ddp.all_mean(torch.stack([step.total, *step.losses.values()]))
                if not torch.isfinite(means[0]):
                    values = {k: float(v) for k, v in zip(step.losses, means[1:], strict=True)}
                    total = float(means[0])
                    raise TrainingError(
                        f"training diverged: loss is {total} at epoch {epoch + 1}, "
                        f"iteration {self.iteration + 1} ({values}); lower the learning rate"
                    )
                self.optimizer.zero_grad(set_to_none=True)
                step.total.backward()
                ddp.average_gradients(self.params)
                if s.grad_clip:
                    nn.utils.clip_grad_norm_(self.params, s.grad_clip)
                self.optimizer.step()
                self.iteration += 1
                window_images += images.shape[0] * ddp.world()

                now = time.monotonic()
                epoch_end = self.iteration % self.per_epoch == 0
                if s.checkpoint_every and self.iteration % s.checkpoint_every == 0 or epoch_end:
                    self.save_checkpoint()
                if epoch_end or now - last_report >= self.report_every_s or self.stop_requested:
                    rate = window_images / max(now - window_start, 1e-6)
                    eta = (self.total_iters - self.iteration) * s.batch_size / max(rate, 1e-6)
                    losses = {k: round(float(v), 5) for k, v in zip(step.losses, means[1:], strict=True)}
                    losses["total"] = round(float(means[0]), 5)
                    self.report("train", losses, rate, eta)
                    self.log(
                        f"epoch {epoch + 1} iter {self.iteration}/{self.total_iters} "
                        f"lr {self.optimizer.param_groups[0]['lr']:.5f} {losses} {rate:.2f} img/s"
                    )
                    last_report, window_start, window_images = now, now, 0
                if ddp.any_rank(self.stop_requested, self.device):  # every rank stops after the same step
                    self.save_checkpoint()
                    ddp.barrier()  # no rank exits (which would make torchrun stop the rest) before it is written
                    raise Stopped(f"stopped at iteration {self.iteration}")

    def evaluate(self, model: GFL, classes: ClassMap | None = None) -> dict[str, float]:
        """COCO metrics of ``model`` on the validation split. ``classes``: for a teacher of other classes,
        which dataset class each of its classes stands for (its other classes' detections are dropped)."""
        detections = predict_dataset(model, self.val_loader, self.device)
        if classes is not None and not classes.identity:
            dataset_labels: dict[int, list[int]] = {}
            for d, t in zip(classes.student, classes.teacher, strict=True):
                dataset_labels.setdefault(t, []).append(d)
            detections = [
                {**det, "category_id": d} for det in detections for d in dataset_labels.get(det["category_id"], [])
            ]
        for det in detections:  # contiguous labels -> the dataset's own category ids
            det["category_id"] = self.data.category_ids[det["category_id"]]
        return coco_ap(self.data.ground_truth(self.val_ids), detections)

    def _classes(self) -> ClassMap | None:
        """KD's class correspondence of a distillation (None for a ``train`` job)."""
        return self.criterion.classes if isinstance(self.criterion, DistillCriterion) else None

    def train_loader_for_eval(self) -> DataLoader:
        train = self.train_loader.dataset
        plain = DetectionDataset(self.data, train.image_ids, image_size=train.image_size, train=False)
        return DataLoader(
            plain,
            batch_size=self.train_loader.batch_sampler.batch_size,  # a GroupedBatchSampler's
            collate_fn=collate,
            num_workers=self.train_loader.num_workers,
        )

    def run(self) -> dict[str, Any]:
        self.try_resume()
        ddp.broadcast_state(self.model, self.adapters)
        diagnostics_before = None
        if self.teacher is not None and self.resumed_from is None and ddp.is_main():
            diagnostics_before = diagnostics(self.model, self.teacher, self.val_loader, self.device, self._classes())
            # Figure 5's "before": kept with figure 4's in the file, so a resumed attempt still has it.
            diagnostics_before["figure5"] = figure5(self.model, self.teacher, self.val_loader, self.device)
            atomic_write_json(self.out / "diagnostics_before.json", diagnostics_before)
        ddp.barrier()  # the other ranks wait for rank 0's diagnostics (within the group's timeout)
        self.report("train")
        started = time.monotonic()
        self.train()
        if not ddp.is_main():  # rank 0 alone evaluates and writes the model; the others are done
            return {}
        self.report("eval")
        metrics: dict[str, Any] = {
            "bbox": self.evaluate(self.model),
            "iterations": self.total_iters,
            "warmup_iters": self.warmup,
            "init": self.init_report.summary(),
            "train_seconds_this_attempt": round(time.monotonic() - started, 1),
            "resumed_from_iter": self.resumed_from,
        }
        if self.teacher is not None:
            before = diagnostics_before
            if before is None and (self.out / "diagnostics_before.json").exists():
                before = json.loads((self.out / "diagnostics_before.json").read_text())
            before_maps = (before or {}).pop("figure5", None)
            metrics["diagnostics"] = {
                "before": before,
                "after": diagnostics(self.model, self.teacher, self.val_loader, self.device, self._classes()),
                "figure5": {
                    "before": before_maps,
                    "after": figure5(self.model, self.teacher, self.val_loader, self.device),
                },
            }
            assert isinstance(self.criterion, DistillCriterion)
            metrics["class_map"] = self.criterion.class_report()
            # The job check's finding: how many validation images the teacher trained on, and whether allowed.
            metrics["teacher_overlap"] = self.spec.teacher_overlap
            if self.teacher_cache is not None:
                metrics["teacher_cache"] = self.teacher_cache.report()
                self.log(f"teacher cache: {metrics['teacher_cache']}")
            # The teacher's AP on the dataset's classes it knows (None when it knows none of them).
            classes = self._classes()
            metrics["teacher_bbox"] = self.evaluate(self.teacher, classes) if classes.kd_possible else None
        atomic_save(detector_state(self.model, {**self.meta(), "metrics": metrics["bbox"]}), self.out / "model.pt")
        atomic_write_json(self.out / "metrics.json", metrics)
        self.report("done", {k: v for k, v in metrics["bbox"].items()})
        self.log(f"done: {metrics['bbox']}")
        return metrics


def run(
    spec: LocalJobSpec,
    out_dir: str | os.PathLike,
    progress: Progress | None = None,
    device: str | torch.device | None = None,
    report_every_s: float = 2.0,
    weights_dir: str | os.PathLike | None = None,
    min_free_bytes: int = 0,
) -> dict[str, Any]:
    """Trains (or distils) one job into ``out_dir``, resuming from its last checkpoint if there is one.

    ``progress`` is called with each progress state (at least every ``report_every_s`` seconds and at each
    epoch end); it may set nothing but can raise to abort the run.
    """
    trainer = Trainer(spec, out_dir, progress, device, report_every_s, weights_dir, min_free_bytes)

    def on_signal(signum: int, frame: Any) -> None:
        trainer.stop_requested = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} if _main_thread() else {}
    try:
        return trainer.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------- helpers


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()

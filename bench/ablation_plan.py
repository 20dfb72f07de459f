"""The ablation's plan: its rows (which distillation terms each switches on), the run settings, the data
set, and one run of the training loop (``bench/ablation.py`` runs them and ``ablation_report`` sums them up).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill.spec import METHOD_WEIGHTS

SHARED = Path(__file__).resolve().parents[1].parent / "shared/data"
RACCOON = Path(os.environ.get("LDD_RACCOON", SHARED / "raccoon-voc"))
BCCD = Path(os.environ.get("LDD_BCCD", SHARED / "bccd-voc"))
IMITATION_NAMES = {
    "fitnets": "FitNets",
    "inside_gt": "Inside GT box",
    "main_region": "Main region",
    "fine_grained": "Fine-Grained",
    "defeat": "DeFeat",
    "gi": "GI imitation",
    "pkd": "PKD",
}
ROWS: dict[str, tuple[str, dict[str, Any] | None]] = {
    # row: (name, changes to the default DistillSpec; None = trained alone)
    "a": ("student alone", None),
    "b": ("Main KD", {"weights": {"main_ld": 0, "vlr_ld": 0, "vlr_kd": 0}}),
    "c": ("Main LD", {"weights": {"vlr_ld": 0, "main_kd": 0, "vlr_kd": 0}}),
    "d": ("Main LD + VLR LD", {"weights": {"main_kd": 0, "vlr_kd": 0}}),
    "e": ("Main KD + Main LD + VLR LD", {}),
    "f": ("TBR", {"method": "tbr", "weights": {"main_kd": 0, "vlr_kd": 0}}),
    "g": ("CrossKD", {"method": "crosskd"}),
    "h": ("BCKD", {"method": "bckd"}),
    "i": ("CrossKD + Main KD + Main LD + VLR LD", {"method": "crosskd", "weights": METHOD_WEIGHTS["ld"]}),
    # The paper's table 3 (bench/imitation.py): each feature imitation alone, then LD's default (row e) plus it,
    # then CrossKD + PKD, the strongest published pairing.
    **{
        row: (IMITATION_NAMES[term], {"method": term, "weights": {"main_kd": 0}})
        for row, term in zip("jklmnop", IMITATION_NAMES, strict=True)
    },
    **{
        row: (f"LD + {IMITATION_NAMES[term]}", {"weights": {term: METHOD_WEIGHTS[term][term]}})
        for row, term in zip("qrstuvw", IMITATION_NAMES, strict=True)
    },
    "x": ("CrossKD + PKD", {"method": "crosskd", "weights": {"pkd": 1.0}}),
}
METRICS = ("AP", "AP50", "AP75")
# The table's term columns, in this order, for the terms some row switches on.
TERMS = {
    "main_kd": "Main KD",
    "main_ld": "Main LD",
    "vlr_ld": "VLR LD",
    "vlr_kd": "VLR KD",
    "tbr": "TBR",
    "fitnets": "FitNets",
    "inside_gt": "Inside GT",
    "main_region": "Main region imit.",
    "fine_grained": "Fine-Grained",
    "defeat": "DeFeat",
    "gi": "GI",
    "pkd": "PKD",
    "crosskd_cls": "CrossKD cls",
    "crosskd_reg": "CrossKD reg",
    "bckd_cls": "BCKD cls",
    "bckd_loc": "BCKD loc",
}


@dataclass
class Plan:
    dataset: str = "synthetic"  # or "raccoon", "bccd"
    rows: str = "abcdef"
    seeds: int = 3
    student_arch: str = "gfl_tiny"
    # ResNet-18 layout at half width, 64-channel FPN/head, 4 stacked convs: 4x the student's parameters.
    # gfl_r18's forward pass alone costs 5x a tiny student step on this CPU: no time would be left for students.
    teacher_arch: str = "gfl_small"
    # The synthetic set's regime: single-class digit detection with objects of 20-64 px. Measured on this
    # 2-core CPU (bench/results/tuning/): the 4x bigger teacher reaches AP 0.64 (AP75 0.77) in 24 epochs
    # and the student alone AP 0.56 (AP75 0.64) in 12, with a spread over seeds of about 1 AP: a gap for
    # distillation to close, smaller than the gap. Shorter student schedules (3 epochs) left a spread of
    # 4-7 AP that swamped every effect; 288 validation images keep the evaluation's own noise down.
    image_size: tuple[int, int] = (160, 128)
    num_train: int = 480
    num_val: int = 288
    num_classes: int = 1  # synthetic: digits 0..num_classes-1
    object_size: tuple[int, int] = (20, 64)  # synthetic: digit height range in pixels
    max_objects: int = 4
    batch: int = 4
    epochs: int = 12
    lr: float = 0.02
    warmup_iters: int = 50
    teacher_epochs: int = 24
    teacher_lr: float = 0.02
    distill: dict[str, Any] = field(default_factory=dict)  # job-level changes to DistillSpec (tuning)
    jobs: int = 1
    threads: int = 1
    device: str = "cpu"


def worker_init(threads: int) -> None:
    """Each run process's torch threads (``ProcessPoolExecutor``'s initializer)."""
    import torch

    torch.set_num_threads(threads)


def _merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in changes.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def job_spec(plan: Plan, data_dir: Path, row: str | None, seed: int, teacher: Path | None) -> dict[str, Any]:
    """The JSON body of one job: the student for a row, or the teacher (``row=None``)."""
    is_teacher = row is None
    schedule = {
        "epochs": plan.teacher_epochs if is_teacher else plan.epochs,
        "batch_size": plan.batch,
        "lr": plan.teacher_lr if is_teacher else plan.lr,
        "image_size": list(plan.image_size),
        "warmup_iters": plan.warmup_iters,
        "num_workers": 0,
    }
    spec: dict[str, Any] = {
        "kind": "train",
        "name": "teacher" if is_teacher else f"{row}-seed{seed}",
        "dataset": str(data_dir),
        "schedule": schedule,
        "seed": seed,
        "student": {"arch": plan.teacher_arch if is_teacher else plan.student_arch},
    }
    changes = None if is_teacher else ROWS[row][1]
    if changes is not None:
        spec.update(kind="distill", teacher={"path": str(teacher)}, distill=_merge(plan.distill, changes))
    return spec


def run_job(spec: dict[str, Any], out_dir: str, device: str) -> dict[str, Any]:
    """One run through the training loop, in a worker process."""
    from distill.spec import LocalJobSpec
    from distill.train import run

    started = time.monotonic()
    metrics = run(LocalJobSpec.model_validate(spec), out_dir, device=device)
    metrics["wall_s"] = round(time.monotonic() - started, 1)
    metrics["spec"] = spec
    return metrics


def teacher_result(future: Any, reused: Path | None, runs_dir: Path) -> tuple[dict[str, Any], Path]:
    """The teacher's metrics and checkpoint: trained in this run (``future``), or reused from ``--teacher``."""
    if future is None:
        assert reused is not None
        teacher = json.loads((reused.parent / "metrics.json").read_text())
        teacher["reused_from"] = str(reused)
        return teacher, reused
    return future.result(), runs_dir / "teacher" / "model.pt"


def prepare_data(plan: Plan, work: Path) -> Path:
    if plan.dataset in ("raccoon", "bccd"):
        from distill.data.voc import import_voc

        out = work / plan.dataset
        if not (out / "annotations.json").exists():
            if plan.dataset == "raccoon":
                import_voc(
                    RACCOON,
                    out,
                    splits={"train": RACCOON / "data/train_labels.csv", "val": RACCOON / "data/test_labels.csv"},
                )
            else:  # train on trainval, evaluate on test (split() validates on test when there is no val)
                import_voc(BCCD, out, image_sets={"trainval": "train", "test": "test"})
        return out
    from distill.data.synthetic import make_synthetic

    name = (
        f"synthetic-{plan.image_size[0]}x{plan.image_size[1]}-{plan.num_train}-{plan.num_val}-c{plan.num_classes}"
        f"-s{plan.object_size[0]}-{plan.object_size[1]}-o{plan.max_objects}"
    )
    return make_synthetic(
        work / name,
        num_train=plan.num_train,
        num_val=plan.num_val,
        image_size=tuple(plan.image_size),
        num_classes=plan.num_classes,
        min_size=plan.object_size[0],
        max_size=plan.object_size[1],
        max_objects=plan.max_objects,
        seed=0,
    )

"""Distillation terms of the paper's eq. 5 (LD on Main and VLR, classification KD) and the comparison
methods (TBR, FitNets), assembled for one training step. (Skeleton: being written.)"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from distill.assigners import Assignment
from distill.models.gfl import GFL
from distill.spec import DistillSpec


@dataclass
class HeadOutputs:
    cls: Tensor  # (B, A, C) class logits
    reg: Tensor  # (B, A, 4, reg_max + 1) edge logits
    feats: list[Tensor] | None = None  # FPN levels (N, channels, H_l, W_l), only when a method needs them


@dataclass
class BatchContext:
    points: Tensor  # (A, 2) location centres in input pixels
    strides: Tensor  # (A,)
    counts: list[int]  # locations per level
    anchors: Tensor  # (A, 4) preset square anchors (8 x stride)
    assignment: Assignment  # the student's ATSS assignment (Main region = assignment.positive)
    gt_boxes: Tensor  # (B, G, 4) padded
    gt_labels: Tensor  # (B, G)
    gt_valid: Tensor  # (B, G) bool
    gfl_state: dict[str, Tensor]  # what distill.losses.gfl.gfl_losses returned besides the losses


class TeacherMismatch(ValueError):
    pass


def check_teacher(teacher: GFL, student: GFL) -> None:
    raise NotImplementedError


def needs_features(spec: DistillSpec) -> bool:
    return spec.method == "fitnets"


def build_adapters(student: GFL, teacher: GFL, spec: DistillSpec) -> nn.Module | None:
    return None


def distillation_losses(
    student: HeadOutputs, teacher: HeadOutputs, ctx: BatchContext, spec: DistillSpec, adapters: nn.Module | None
) -> dict[str, Tensor]:
    raise NotImplementedError

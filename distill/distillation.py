"""Distillation terms of the paper's eq. 5 (LD on Main and VLR, classification KD) and the comparison
methods (TBR, FitNets), assembled for one training step; plus the teacher check and the diagnostics of the
paper's figure 4.

The training loop owns the teacher's forward pass (eval mode, ``no_grad``, autocast on GPU) and the GFL
losses; :func:`distillation_losses` adds the weighted distillation terms. Every term is a weighted mean
over its region (LD over the region's edges, KD over its locations), so its size does not change with the
batch size or the number of objects, and a weight of 0 skips the term's computation entirely.

``method`` (a job field) picks how localization knowledge is transferred:

- ``ld``: LD on the Main region (``main_ld``) and on the VLR (``vlr_ld``), the paper's method;
- ``tbr``: the teacher's boxes as bounded pseudo regression targets on the Main region (paper eq. 6);
- ``fitnets``: imitation of the teacher's FPN levels through 1x1 conv adapters.

Classification KD (``main_kd``, ``vlr_kd``) is independent of the method and applies whenever weighted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.assigners import Assignment
from distill.boxes import distance_to_box
from distill.losses.gfl import giou_loss
from distill.losses.ld import ld_loss, sigmoid_kd_loss
from distill.models.gfl import GFL
from distill.regions import Regions, find_regions
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
    """Raises :class:`TeacherMismatch` naming every difference that makes distillation meaningless: the
    edge distributions must have the same bins (``reg_max``), the locations the same strides, and the
    class logits the same classes in the same order."""
    problems = []
    if teacher.reg_max != student.reg_max:
        problems.append(f"reg_max differs (teacher {teacher.reg_max}, student {student.reg_max}): LD compares "
                        "edge distributions bin by bin")
    if tuple(teacher.strides) != tuple(student.strides):
        problems.append(f"strides differ (teacher {list(teacher.strides)}, student {list(student.strides)})")
    if teacher.num_classes != student.num_classes:
        problems.append(f"number of classes differs (teacher {teacher.num_classes}, student "
                        f"{student.num_classes})")
    elif teacher.cfg.classes and student.cfg.classes and list(teacher.cfg.classes) != list(student.cfg.classes):
        problems.append(f"class names differ (teacher {teacher.cfg.classes[:10]}, student "
                        f"{student.cfg.classes[:10]})")
    if problems:
        raise TeacherMismatch("teacher does not match the student: " + "; ".join(problems))


def needs_features(spec: DistillSpec) -> bool:
    """Whether the step must pass FPN features (only FitNets imitates them)."""
    return spec.method == "fitnets" and spec.weights.fitnets > 0


def build_adapters(student: GFL, teacher: GFL, spec: DistillSpec) -> nn.Module | None:
    """FitNets' regressors: one 1x1 conv per FPN level from the student's channels to the teacher's.
    Trained with the student (optimiser and checkpoint) but not part of the exported detector."""
    if not needs_features(spec):
        return None
    return nn.ModuleList(nn.Conv2d(student.cfg.channels, teacher.cfg.channels, 1)
                         for _ in student.strides)


def distillation_losses(
    student: HeadOutputs, teacher: HeadOutputs, ctx: BatchContext, spec: DistillSpec, adapters: nn.Module | None
) -> dict[str, Tensor]:
    """The weighted distillation terms of one batch: ``main_ld``, ``vlr_ld``, ``main_kd``, ``vlr_kd``,
    ``tbr``, ``fitnets`` (those that are on). Teacher outputs are detached."""
    w = spec.weights
    ld_on = spec.method == "ld"
    losses: dict[str, Tensor] = {}
    pos_b, pos_a = _positives(ctx)
    if ld_on and w.main_ld > 0:
        losses["main_ld"] = w.main_ld * _region_ld(student.reg, teacher.reg, pos_b, pos_a, None, spec.tau)
    if w.main_kd > 0:
        losses["main_kd"] = w.main_kd * _region_kd(student.cls, teacher.cls, pos_b, pos_a, None, spec.kd_tau)
    if (ld_on and w.vlr_ld > 0) or w.vlr_kd > 0:
        regions = batch_regions(ctx, spec.gamma)
        vlr_b, vlr_a = regions.vlr.nonzero(as_tuple=True)
        vlr_w = regions.vlr_weight[vlr_b, vlr_a]
        if ld_on and w.vlr_ld > 0:
            losses["vlr_ld"] = w.vlr_ld * _region_ld(student.reg, teacher.reg, vlr_b, vlr_a, vlr_w, spec.tau)
        if w.vlr_kd > 0:
            losses["vlr_kd"] = w.vlr_kd * _region_kd(student.cls, teacher.cls, vlr_b, vlr_a, vlr_w, spec.kd_tau)
    if spec.method == "tbr" and w.tbr > 0:
        losses["tbr"] = w.tbr * _tbr(teacher.reg, ctx, spec.tbr_margin)
    if spec.method == "fitnets" and w.fitnets > 0:
        if student.feats is None or teacher.feats is None or adapters is None:
            raise ValueError("method 'fitnets' needs student and teacher features and the adapters")
        losses["fitnets"] = w.fitnets * _fitnets(student.feats, teacher.feats, adapters)
    return losses


def batch_regions(ctx: BatchContext, gamma: float) -> Regions:
    """:func:`distill.regions.find_regions` for the student's ATSS assignment of this batch."""
    a = ctx.assignment
    return find_regions(ctx.anchors, ctx.gt_boxes, ctx.gt_valid, a.positive, a.threshold, gamma)


# ----------------------------------------------------------------------------------------------- terms


def _positives(ctx: BatchContext) -> tuple[Tensor, Tensor]:
    state = ctx.gfl_state
    if "pos_b" in state and "pos_a" in state:  # already computed by gfl_losses: saves a device sync
        return state["pos_b"], state["pos_a"]
    return ctx.assignment.positive.nonzero(as_tuple=True)


def _weighted_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    """``sum(w * v) / sum(w)`` over rows (a plain mean without weights); 0, still differentiable, when the
    region is empty."""
    if weights is None:
        return values.sum() / max(values.shape[0], 1)
    return (values * weights).sum() / weights.sum().clamp(min=1e-6)


def _region_ld(s_reg: Tensor, t_reg: Tensor, b: Tensor, a: Tensor, weights: Tensor | None, tau: float) -> Tensor:
    """Mean LD per edge over a region: ``s_reg``, ``t_reg`` ``(B, A, 4, R + 1)``, locations ``(b, a)``,
    optional per-location weights ``(K,)``."""
    bins = s_reg.shape[-1]
    per_edge = ld_loss(s_reg[b, a].reshape(-1, bins), t_reg[b, a].reshape(-1, bins), tau).reshape(-1, 4)
    return _weighted_mean(per_edge.mean(1), weights)


def _region_kd(s_cls: Tensor, t_cls: Tensor, b: Tensor, a: Tensor, weights: Tensor | None, tau: float) -> Tensor:
    """Mean Bernoulli KD per location over a region: ``s_cls``, ``t_cls`` ``(B, A, C)``."""
    return _weighted_mean(sigmoid_kd_loss(s_cls[b, a], t_cls[b, a], tau), weights)


def _expected_distance(logits: Tensor) -> Tensor:
    """``(..., R + 1)`` edge logits -> ``(...)`` expected bin (GFL's integral), in stride units."""
    bins = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)
    return F.softmax(logits.float(), dim=-1) @ bins


def _tbr(t_reg: Tensor, ctx: BatchContext, margin: float) -> Tensor:
    """Teacher-bounded pseudo box regression on the Main region (paper eq. 6, after Chen et al. 2017):
    the GIoU loss between the student's box and the teacher's box, active only where the student is
    farther from the ground truth than the teacher, ``||b_s - b||^2 + margin > ||b_t - b||^2`` (squared
    L2 of the corners in stride units). Mean over the Main region."""
    state = ctx.gfl_state
    pos_b, pos_a = _positives(ctx)
    s_box = state["pos_pred"]  # (P, 4) student boxes in stride units, with gradient
    gt_box = state["pos_target"]
    t_box = distance_to_box(state["centre"], _expected_distance(t_reg[pos_b, pos_a].detach()))
    active = ((s_box.detach() - gt_box).pow(2).sum(1) + margin > (t_box - gt_box).pow(2).sum(1)).float()
    return _weighted_mean(giou_loss(s_box, t_box) * active, None)


def _fitnets(s_feats: list[Tensor], t_feats: list[Tensor], adapters: nn.Module) -> Tensor:
    """Mean squared error between adapted student and teacher FPN levels, averaged over the levels."""
    terms = [F.mse_loss(adapt(s.float()), t.detach().float())
             for s, t, adapt in zip(s_feats, t_feats, adapters, strict=True)]
    return torch.stack(terms).mean()


# ----------------------------------------------------------------------------------------------- diagnostics


@torch.no_grad()
def diagnostics(student: GFL, teacher: GFL, loader: Iterable, device: torch.device | str) -> dict:
    """Paper figure 4: per FPN level, the mean L1 error between teacher and student over a loader.

    - ``cls_l1``: ``|sigmoid(z_S) - sigmoid(z_T)|`` averaged over locations and classes;
    - ``box_l1``: the L1 distance between the edge distributions, ``sum_i |softmax(z_S)_i - softmax(z_T)_i|``
      (in ``[0, 2]``), averaged over locations and the four edges.

    Only locations inside each image's unpadded area count. Both models run in eval mode; the student's
    train/eval mode is restored afterwards. Returns ``{"strides", "cls_l1", "box_l1"}`` (lists over the
    levels), their location-weighted means ``cls_l1_mean``, ``box_l1_mean``, and ``images``.
    """
    was_training = student.training
    student.eval()
    teacher.eval()
    device = torch.device(device)
    num_levels = len(student.strides)
    cls_sum = torch.zeros(num_levels, dtype=torch.float64)
    box_sum = torch.zeros(num_levels, dtype=torch.float64)
    count = torch.zeros(num_levels, dtype=torch.float64)
    images_seen = 0
    try:
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            s_cls_maps, s_reg_maps = student.raw_outputs(images)
            s_cls, s_reg = student.flatten(s_cls_maps, s_reg_maps)
            t_cls, t_reg = teacher.flatten(*teacher.raw_outputs(images))
            points, _, counts = student.locations(s_cls_maps)
            sizes = torch.tensor([list(t.get("size", images.shape[-2:])) for t in targets], device=device,
                                 dtype=torch.float32)  # (B, 2) unpadded (h, w)
            inside = (points[None, :, 0] < sizes[:, None, 1]) & (points[None, :, 1] < sizes[:, None, 0])  # (B, A)
            cls_err = (s_cls.float().sigmoid() - t_cls.float().sigmoid()).abs().mean(-1)  # (B, A)
            box_err = (F.softmax(s_reg.float(), -1) - F.softmax(t_reg.float(), -1)).abs().sum(-1).mean(-1)
            level = torch.repeat_interleave(torch.arange(num_levels, device=device),
                                            torch.tensor(counts, device=device))  # (A,)
            cls_sum += _sum_per_level(cls_err, inside, level, num_levels)
            box_sum += _sum_per_level(box_err, inside, level, num_levels)
            count += _sum_per_level(torch.ones_like(cls_err), inside, level, num_levels)
            images_seen += images.shape[0]
    finally:
        student.train(was_training)
    safe = count.clamp(min=1)
    total = max(float(count.sum()), 1.0)
    return {
        "strides": list(student.strides),
        "cls_l1": [round(float(v), 6) for v in cls_sum / safe],
        "box_l1": [round(float(v), 6) for v in box_sum / safe],
        "cls_l1_mean": round(float(cls_sum.sum()) / total, 6),
        "box_l1_mean": round(float(box_sum.sum()) / total, 6),
        "images": images_seen,
    }


def _sum_per_level(values: Tensor, inside: Tensor, level: Tensor, num_levels: int) -> Tensor:
    """``values (B, A)`` summed over the images' unpadded locations (``inside (B, A)``) of each level
    (``level (A,)``) -> ``(num_levels,)`` float64 on the CPU."""
    sums = torch.zeros(num_levels, dtype=torch.float64, device=values.device)
    return sums.index_add_(0, level, (values.double() * inside).sum(0)).cpu()

"""The distillation terms of the paper's eq. 5 (LD on a region, classification KD) and of the comparison
methods (TBR, FitNets); the teacher check; and the diagnostics of the paper's figure 4.

Each term is a function of the student's and the teacher's outputs on one region; the distillation
criterion (:class:`distill.criterion.DistillCriterion`) picks the regions, weights the terms and skips those
whose weight is 0. Every term is a weighted mean over its region (LD over the region's edges, KD over its
locations), so its size does not change with the batch size or the number of objects. The teacher side is
always detached.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.boxes import distance_to_box
from distill.class_map import ClassMap
from distill.ddp import mean_denominator
from distill.losses.gfl import Positives, giou_loss
from distill.losses.ld import ld_loss, sigmoid_kd_loss
from distill.models.gfl import GFL
from distill.spec import DistillSpec


class TeacherMismatch(ValueError):
    pass


def check_teacher(teacher: GFL, student: GFL) -> None:
    """Raises :class:`TeacherMismatch` naming every difference that makes distillation meaningless: the
    edge distributions must have the same bins (``reg_max``) and the locations the same strides. The
    classes may differ: LD needs none, and KD maps them (:func:`distill.class_map.map_classes`)."""
    problems = []
    if teacher.reg_max != student.reg_max:
        problems.append(f"reg_max differs (teacher {teacher.reg_max}, student {student.reg_max}): LD compares "
                        "edge distributions bin by bin")
    if tuple(teacher.strides) != tuple(student.strides):
        problems.append(f"strides differ (teacher {list(teacher.strides)}, student {list(student.strides)})")
    if problems:
        raise TeacherMismatch("teacher does not match the student: " + "; ".join(problems))


def needs_features(spec: DistillSpec) -> bool:
    """Whether the step must keep FPN features (only FitNets imitates them)."""
    return spec.weights.value("fitnets") > 0


def build_adapters(student: GFL, teacher: GFL, spec: DistillSpec) -> nn.Module | None:
    """FitNets' regressors: one 1x1 conv per FPN level from the student's channels to the teacher's.
    Trained with the student (optimiser and checkpoint) but not part of the exported detector."""
    if not needs_features(spec):
        return None
    return nn.ModuleList(nn.Conv2d(student.cfg.channels, teacher.cfg.channels, 1)
                         for _ in student.strides)


# ----------------------------------------------------------------------------------------------- terms


def weighted_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    """``sum(w * v) / sum(w)`` over rows ``(K,)`` (a plain mean without weights); 0, still differentiable,
    when the region is empty. Over several processes the divisor is the global batch's
    (:func:`distill.ddp.mean_denominator`): every rank must call this for every enabled term, even when its
    own region is empty."""
    if weights is None:
        return values.sum() / mean_denominator(values.new_tensor(float(values.shape[0])), 1.0)
    return (values * weights).sum() / mean_denominator(weights.sum(), 1e-6)


def region_ld(s_reg: Tensor, t_reg: Tensor, b: Tensor, a: Tensor, weights: Tensor | None, tau: float) -> Tensor:
    """Mean LD per edge over a region: ``s_reg``, ``t_reg`` ``(B, A, 4, R + 1)``, locations ``(b, a)`` each
    ``(K,)``, optional per-location weights ``(K,)``."""
    bins = s_reg.shape[-1]
    per_edge = ld_loss(s_reg[b, a].reshape(-1, bins), t_reg[b, a].reshape(-1, bins), tau).reshape(-1, 4)
    return weighted_mean(per_edge.mean(1), weights)


def region_kd(s_cls: Tensor, t_cls: Tensor, b: Tensor, a: Tensor, weights: Tensor | None, tau: float,
              columns: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Mean Bernoulli KD per location over a region: ``s_cls (B, A, C_S)``, ``t_cls (B, A, C_T)``, locations
    ``(b, a)``. ``columns``: the student's and the teacher's class indices ``(M,)`` that KD pairs (student
    column ``columns[0][i]`` learns from teacher column ``columns[1][i]``); None pairs every column with the
    same one (same classes, same order)."""
    s, t = s_cls[b, a], t_cls[b, a]  # (K, C_S), (K, C_T)
    if columns is not None:
        s, t = s[:, columns[0]], t[:, columns[1]]
    return weighted_mean(sigmoid_kd_loss(s, t, tau), weights)


def tbr_loss(t_reg: Tensor, pos: Positives, integral: nn.Module, margin: float) -> Tensor:
    """Teacher-bounded pseudo box regression on the Main region (paper eq. 6, after Chen et al. 2017):
    the GIoU loss between the student's box and the teacher's box, active only where the student is
    farther from the ground truth than the teacher, ``||b_s - b||^2 + margin > ||b_t - b||^2`` (squared
    L2 of the corners in stride units). ``t_reg (B, A, 4, R + 1)``; ``integral``: the student's
    :class:`distill.models.gfl.Integral` (the teacher has the same ``reg_max``). Mean over the Main region."""
    t_box = distance_to_box(pos.centre, integral(t_reg[pos.b, pos.a].detach()))  # (P, 4)
    active = ((pos.pred.detach() - pos.target).pow(2).sum(1) + margin > (t_box - pos.target).pow(2).sum(1)).float()
    return weighted_mean(giou_loss(pos.pred, t_box) * active, None)


def fitnets_loss(s_feats: list[Tensor], t_feats: list[Tensor], adapters: nn.Module) -> Tensor:
    """Mean squared error between adapted student and teacher FPN levels ``(B, channels, H_l, W_l)``,
    averaged over the levels."""
    terms = [F.mse_loss(adapt(s.float()), t.detach().float())
             for s, t, adapt in zip(s_feats, t_feats, adapters, strict=True)]
    return torch.stack(terms).mean()


# ----------------------------------------------------------------------------------------------- diagnostics


@torch.no_grad()
def diagnostics(student: GFL, teacher: GFL, loader: Iterable, device: torch.device | str,
                classes: ClassMap | None = None) -> dict:
    """Paper figure 4: per FPN level, the mean L1 error between teacher and student over a loader.

    - ``cls_l1``: ``|sigmoid(z_S) - sigmoid(z_T)|`` averaged over locations and the classes that ``classes``
      pairs (None: the same columns, same classes); None when no class pairs (a teacher of other classes);
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
    no_class = classes is not None and not classes.kd_possible
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
            box_err = (F.softmax(s_reg.float(), -1) - F.softmax(t_reg.float(), -1)).abs().sum(-1).mean(-1)
            if classes is not None and not classes.identity:
                s_cls, t_cls = s_cls[..., list(classes.student)], t_cls[..., list(classes.teacher)]
            cls_err = (s_cls.float().sigmoid() - t_cls.float().sigmoid()).abs().mean(-1) if not no_class \
                else torch.zeros_like(box_err)  # (B, A)
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
        "cls_l1": None if no_class else [round(float(v), 6) for v in cls_sum / safe],
        "box_l1": [round(float(v), 6) for v in box_sum / safe],
        "cls_l1_mean": None if no_class else round(float(cls_sum.sum()) / total, 6),
        "box_l1_mean": round(float(box_sum.sum()) / total, 6),
        "images": images_seen,
    }


def _sum_per_level(values: Tensor, inside: Tensor, level: Tensor, num_levels: int) -> Tensor:
    """``values (B, A)`` summed over the images' unpadded locations (``inside (B, A)``) of each level
    (``level (A,)``) -> ``(num_levels,)`` float64 on the CPU."""
    sums = torch.zeros(num_levels, dtype=torch.float64, device=values.device)
    return sums.index_add_(0, level, (values.double() * inside).sum(0)).cpu()

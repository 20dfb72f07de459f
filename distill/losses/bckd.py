"""BCKD (Yang et al., "Bridging Cross-task Protocol Inconsistency for Distillation in Dense Object Detection",
ICCV 2023), written from the paper; DESIGN section 3.

A sigmoid detector's classifier is a set of independent binary problems, so its distillation is too:

- classification: at every location and class, BCE of the student's logit to the teacher's probability,
  weighted by ``|p_S - p_T|^beta`` (hard locations count more, as in Quality Focal Loss); :func:`binary_kd`;
- localization: ``1 - GIoU`` between the student's and the teacher's decoded boxes at every location,
  weighted by the largest class-probability difference there (detached): boxes are imitated where the
  classifier still disagrees, which covers objects and their surroundings without an assigner.

Both are means over the valid locations (the images' unpadded areas) through
:func:`distill.losses.reduce.weighted_mean`, so batch size and object count do not change their scale (the
reference divides sums by the number of positives, which ties the weight to the data set). The teacher side
is always detached. CrossKD (:mod:`distill.losses.crosskd`) reuses :func:`binary_kd` for its cross-head
classification.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distill.boxes import distance_to_box
from distill.losses.gfl import giou_loss
from distill.losses.reduce import weighted_mean


def binary_kd(student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0) -> Tensor:
    """``sum_c BCE(z_S, sigmoid(z_T)) * |sigmoid(z_S) - sigmoid(z_T)|^beta``: ``(M, C)`` logits each (the
    teacher's detached) -> ``(M,)``, >= 0, exactly 0 where the logits match (the factor is 0 there; the BCE
    alone would be the teacher's entropy). The factor keeps its gradient, as QFL's does."""
    zs = student_logits.float()
    q = teacher_logits.detach().float().sigmoid()
    factor = (zs.sigmoid() - q).abs().pow(beta)
    return (F.binary_cross_entropy_with_logits(zs, q, reduction="none") * factor).sum(-1)


def class_gap(s_cls: Tensor, t_cls: Tensor) -> Tensor:
    """The largest class-probability difference per row, detached: ``(K, C)`` logits each -> ``(K,)``."""
    return (s_cls.detach().float().sigmoid() - t_cls.detach().float().sigmoid()).abs().max(-1).values


def _paired(s_cls: Tensor, t_cls: Tensor, columns: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    return (s_cls, t_cls) if columns is None else (s_cls[:, columns[0]], t_cls[:, columns[1]])


def bckd_cls_loss(
    s_cls: Tensor, t_cls: Tensor, valid: Tensor, beta: float, columns: tuple[Tensor, Tensor] | None = None
) -> Tensor:
    """Mean :func:`binary_kd` over the valid locations: ``s_cls (B, A, C_S)``, ``t_cls (B, A, C_T)``, ``valid
    (B, A)`` bool. ``columns``: the paired student and teacher class indices ``(M,)``, as in
    :func:`distill.losses.ld.region_kd` (None: same classes, same order)."""
    b, a = valid.nonzero(as_tuple=True)
    s, t = _paired(s_cls[b, a], t_cls[b, a], columns)
    return weighted_mean(binary_kd(s, t, beta), None)


def bckd_loc_loss(
    s_reg: Tensor,
    t_reg: Tensor,
    s_cls: Tensor,
    t_cls: Tensor,
    centres: Tensor,
    valid: Tensor,
    integral: nn.Module,
    columns: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """GIoU loss between the student's and the teacher's boxes, weighted by :func:`class_gap`, over the valid
    locations. ``s_reg``, ``t_reg (B, A, 4, R + 1)``; ``s_cls (B, A, C_S)``, ``t_cls (B, A, C_T)`` (the gap
    is taken over the paired ``columns``); ``centres (A, 2)`` location centres in stride units (boxes are
    decoded in stride units, as GFL's GIoU); ``valid (B, A)``; ``integral``: edge logits -> expected bin."""
    b, a = valid.nonzero(as_tuple=True)
    weight = class_gap(*_paired(s_cls[b, a], t_cls[b, a], columns))
    s_box = distance_to_box(centres[a], integral(s_reg[b, a]))
    t_box = distance_to_box(centres[a], integral(t_reg[b, a].detach()))
    return weighted_mean(giou_loss(s_box, t_box), weight)

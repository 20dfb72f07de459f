"""The task losses of the focal-loss families (RetinaNet, FCOS, ATSS): sigmoid focal loss (Lin et al. 2017)
on the classes, GIoU on the decoded boxes and DFL on the edge distributions (every family regresses
distributions, DESIGN section 2), and for FCOS and ATSS the centerness BCE.

Normalisation follows mmdetection's heads: the focal loss is summed over the anchors that are not ignored and
divided by the number of positives, as is the centerness BCE; GIoU and DFL are weighted per positive by
its centerness target (FCOS, ATSS; divided by their sum) or equally (RetinaNet). Divisors are the global
batch's over several processes (:func:`distill.ddp.mean_denominator`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.boxes import box_to_distance
from distill.ddp import mean_denominator
from distill.losses.centerness import centerness_loss, centerness_target
from distill.losses.gfl import Positives, distribution_focal_loss, giou_loss
from distill.spec import GFLWeights

# mmdetection's loss_centerness weight for FCOS and ATSS.
CENTERNESS_WEIGHT = 1.0


def focal_loss(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal loss summed over classes: ``-alpha_t (1 - p_t)^gamma log(p_t)`` per class, where the class of a
    positive has target 1 (weight ``alpha``) and every other class target 0 (weight ``1 - alpha``).

    Args:
        logits: ``(M, C)`` class logits.
        labels: ``(M,)`` class index of positives; any value outside ``[0, C)`` for negatives.
    Returns ``(M,)``.
    """
    num_classes = logits.shape[1]
    pos = (labels >= 0) & (labels < num_classes)
    target = torch.zeros_like(logits)
    target[pos, labels[pos]] = 1.0
    prob = logits.sigmoid()
    p_t = prob * target + (1 - prob) * (1 - target)
    alpha_t = alpha * target + (1 - alpha) * (1 - target)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (alpha_t * (1 - p_t).pow(gamma) * ce).sum(1)


def focal_losses(
    cls: Tensor,
    pos: Positives,
    gt_labels: Tensor,
    weights: GFLWeights,
    ignore: Tensor | None = None,
    quality: Tensor | None = None,
) -> dict[str, Tensor]:
    """Weighted ``focal`` (``weights.cls``), ``giou``, ``dfl`` and, with ``quality``, ``centerness``; a weight of
    0 leaves its term out.

    Args:
        cls: ``(B, A, C)`` class logits; pos: the batch's :class:`Positives` (boxes in stride units).
        gt_labels: ``(B, G)``; ignore: ``(B, A)`` bool, anchors left out of the focal loss (RetinaNet's IoU
            in [0.4, 0.5)); quality: ``(B, A)`` centerness logits (FCOS, ATSS), None for RetinaNet.
    """
    b, a, num_classes = cls.shape
    reg_max = pos.reg.shape[-1] - 1
    num_pos = mean_denominator(torch.tensor(float(pos.b.numel()), device=cls.device), 1.0)
    if quality is not None:
        centre_target = centerness_target(box_to_distance(pos.centre, pos.target))  # (P,)
        box_weight = centre_target
    else:
        centre_target, box_weight = None, torch.ones_like(pos.b, dtype=torch.float32)
    weight_sum = mean_denominator(box_weight.sum(), 1e-6)
    losses: dict[str, Tensor] = {}
    if weights.cls > 0:
        labels = torch.full((b, a), num_classes, dtype=torch.long, device=cls.device)
        labels[pos.b, pos.a] = gt_labels[pos.b, pos.gt]
        keep = torch.ones((b, a), dtype=torch.bool, device=cls.device) if ignore is None else ~ignore
        focal = focal_loss(cls[keep].float(), labels[keep])
        losses["focal"] = weights.cls * focal.sum() / num_pos
    if weights.giou > 0:
        losses["giou"] = weights.giou * (giou_loss(pos.pred, pos.target) * box_weight).sum() / weight_sum
    if weights.dfl > 0:
        target_dist = box_to_distance(pos.centre, pos.target, reg_max)  # (P, 4)
        dfl = distribution_focal_loss(pos.reg.reshape(-1, reg_max + 1), target_dist.reshape(-1)).reshape(-1, 4)
        losses["dfl"] = weights.dfl * (dfl.mean(1) * box_weight).sum() / weight_sum
    if quality is not None and centre_target is not None:
        ctr = centerness_loss(quality[pos.b, pos.a], centre_target)
        losses["centerness"] = CENTERNESS_WEIGHT * ctr.sum() / num_pos
    return losses

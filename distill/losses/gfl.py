"""The GFL detector's own losses: Quality Focal Loss, Distribution Focal Loss, GIoU; and their assembly.

Normalisation follows mmdetection's ``GFLHead``: QFL is summed and divided by the number of positives;
GIoU and DFL are weighted per positive by the (detached) max class score and divided by the sum of those
weights (DFL also by its 4 edges). Over several processes both divisors are the global batch's
(:func:`distill.ddp.mean_denominator`), so the loss scale does not depend on the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.assigners import Assignment
from distill.boxes import aligned_giou, aligned_iou, box_to_distance, distance_to_box
from distill.ddp import mean_denominator
from distill.spec import GFLWeights


@dataclass
class Positives:
    """The assigner's positive locations of a batch (``P`` of them), decoded once for the GFL losses and
    reused by the distillation terms (TBR). Boxes are x1y1x2y2 in stride units (pixels / the location's
    stride), as GFL regresses them."""

    b: Tensor  # (P,) long: image index in the batch
    a: Tensor  # (P,) long: location index (levels concatenated)
    gt: Tensor  # (P,) long: index of the matched ground truth in its image's list
    centre: Tensor  # (P, 2) location centres
    reg: Tensor  # (P, 4, R + 1) the student's edge logits (with gradient)
    pred: Tensor  # (P, 4) the student's boxes decoded from ``reg`` (with gradient)
    target: Tensor  # (P, 4) the matched ground-truth boxes


def quality_focal_loss(logits: Tensor, labels: Tensor, quality: Tensor, beta: float = 2.0) -> Tensor:
    """QFL summed over classes.

    Args:
        logits: ``(M, C)`` class logits.
        labels: ``(M,)`` class index of positives, ``C`` (or any value >= C, or < 0) for negatives.
        quality: ``(M,)`` IoU target of positives (ignored for negatives).
    Returns ``(M,)``.
    """
    prob = logits.sigmoid()
    # Negatives: every class is pushed to 0, scaled by prob^beta.
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * prob.pow(beta)
    num_classes = logits.shape[1]
    pos = ((labels >= 0) & (labels < num_classes)).nonzero().squeeze(1)
    if pos.numel():
        lab = labels[pos]
        q = quality[pos].to(logits.dtype)
        scale = (q - prob[pos, lab]).abs().pow(beta)
        loss[pos, lab] = F.binary_cross_entropy_with_logits(logits[pos, lab], q, reduction="none") * scale
    return loss.sum(1)


def quality_focal_loss_prob(prob: Tensor, labels: Tensor, quality: Tensor, beta: float = 2.0) -> Tensor:
    """QFL of probabilities ``prob (M, C)`` rather than logits (GFocalV2 trains the joint score
    ``sigmoid(cls) * sigmoid(DGQP)``, which no single logit gives); otherwise as :func:`quality_focal_loss`.
    Returns ``(M,)``."""
    p = prob.clamp(1e-6, 1 - 1e-6)
    loss = F.binary_cross_entropy(p, torch.zeros_like(p), reduction="none") * p.pow(beta)
    num_classes = prob.shape[1]
    pos = ((labels >= 0) & (labels < num_classes)).nonzero().squeeze(1)
    if pos.numel():
        lab = labels[pos]
        q = quality[pos].to(p.dtype)
        scale = (q - p[pos, lab]).abs().pow(beta)
        loss[pos, lab] = F.binary_cross_entropy(p[pos, lab], q, reduction="none") * scale
    return loss.sum(1)


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """DFL: cross-entropy towards the two bins around a continuous target.

    ``logits (K, reg_max + 1)``, ``target (K,)`` in ``[0, reg_max)`` -> ``(K,)``.
    """
    left = target.long()
    right = left + 1
    w_left = right.float() - target
    w_right = target - left.float()
    return (
        F.cross_entropy(logits, left, reduction="none") * w_left
        + F.cross_entropy(logits, right, reduction="none") * w_right
    )


def giou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``1 - GIoU`` of matching boxes ``(K, 4)`` -> ``(K,)``."""
    return 1 - aligned_giou(pred, target)


def find_positives(
    reg: Tensor, points: Tensor, strides: Tensor, assignment: Assignment, gt_boxes: Tensor, integral: nn.Module
) -> Positives:
    """The positives of ``assignment`` with their boxes decoded in stride units.

    Args:
        reg: ``(B, A, 4, R + 1)`` edge logits; points: ``(A, 2)``; strides: ``(A,)``.
        assignment: from :func:`distill.assigners.atss_assign`; gt_boxes: ``(B, G, 4)`` in input pixels.
        integral: the detector's :class:`distill.models.gfl.Integral` (edge logits -> expected bin).
    """
    pos_b, pos_a = assignment.positive.nonzero(as_tuple=True)
    gt_idx = assignment.gt_index[pos_b, pos_a]
    stride = strides[pos_a][:, None]
    centre = points[pos_a] / stride
    pos_reg = reg[pos_b, pos_a]
    return Positives(
        pos_b,
        pos_a,
        gt_idx,
        centre,
        pos_reg,
        distance_to_box(centre, integral(pos_reg)),
        gt_boxes[pos_b, gt_idx] / stride,
    )


def gfl_losses(
    cls: Tensor,
    pos: Positives,
    gt_labels: Tensor,
    weights: GFLWeights,
    quality: Tensor | None = None,
    ignore: Tensor | None = None,
) -> dict[str, Tensor]:
    """GFL's weighted QFL (``qfl``), GIoU (``giou``) and DFL (``dfl``) for a batch; a weight of 0 leaves its
    term out and skips its computation.

    Args:
        cls: ``(B, A, C)`` class logits; pos: the batch's :class:`Positives`.
        gt_labels: ``(B, G)`` class of each ground truth (padding is never read: only matched ones are).
        quality: GFocalV2's ``(B, A)`` DGQP logits: QFL then trains the joint score ``sigmoid(cls) *
            sigmoid(quality)``, which also weighs GIoU and DFL (as the authors' ``GFLHeadV2``).
        ignore: ``(B, A)`` bool, locations left out of QFL (the batch's padding).
    """
    b, a, num_classes = cls.shape
    reg_max = pos.reg.shape[-1] - 1
    # Both divisors are all-reduced over the processes of a job, on every rank, whatever weights are set.
    num_pos = mean_denominator(torch.tensor(float(pos.b.numel()), device=cls.device), 1.0)
    prob = None if quality is None else cls.float().sigmoid() * quality.float().sigmoid()[..., None]
    # GIoU and DFL weight each positive by its (detached) best class score, as mmdetection's GFLHead.
    if prob is None:
        score_weight = cls[pos.b, pos.a].detach().sigmoid().max(1).values  # (P,)
    else:
        score_weight = prob[pos.b, pos.a].detach().max(1).values
    weight_sum = mean_denominator(score_weight.sum(), 1e-6)

    losses: dict[str, Tensor] = {}
    if weights.cls > 0:
        labels = torch.full((b, a), num_classes, dtype=torch.long, device=cls.device)
        labels[pos.b, pos.a] = gt_labels[pos.b, pos.gt]
        iou = torch.zeros((b, a), dtype=torch.float32, device=cls.device)
        iou[pos.b, pos.a] = aligned_iou(pos.pred.detach(), pos.target).clamp(min=1e-6)
        if prob is None:
            qfl = quality_focal_loss(cls.reshape(b * a, -1).float(), labels.reshape(-1), iou.reshape(-1))
        else:
            qfl = quality_focal_loss_prob(prob.reshape(b * a, -1), labels.reshape(-1), iou.reshape(-1))
        if ignore is not None:
            qfl = qfl * (~ignore).reshape(-1).to(qfl.dtype)
        losses["qfl"] = weights.cls * qfl.sum() / num_pos
    if weights.giou > 0:
        losses["giou"] = weights.giou * (giou_loss(pos.pred, pos.target) * score_weight).sum() / weight_sum
    if weights.dfl > 0:
        target_dist = box_to_distance(pos.centre, pos.target, reg_max)  # (P, 4)
        dfl = distribution_focal_loss(pos.reg.reshape(-1, reg_max + 1), target_dist.reshape(-1)).reshape(-1, 4)
        losses["dfl"] = weights.dfl * (dfl.mean(1) * score_weight).sum() / weight_sum
    return losses

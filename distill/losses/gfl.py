"""The GFL detector's own losses: Quality Focal Loss, Distribution Focal Loss, GIoU; and their assembly.

Normalisation follows mmdetection's ``GFLHead``: QFL is summed and divided by the number of positives;
GIoU and DFL are weighted per positive by the (detached) max class score and divided by the sum of those
weights (DFL also by its 4 edges).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.assigners import Assignment
from distill.boxes import aligned_giou, aligned_iou, box_to_distance, distance_to_box


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


def distribution_focal_loss(logits: Tensor, target: Tensor) -> Tensor:
    """DFL: cross-entropy towards the two bins around a continuous target.

    ``logits (K, reg_max + 1)``, ``target (K,)`` in ``[0, reg_max)`` -> ``(K,)``.
    """
    left = target.long()
    right = left + 1
    w_left = right.float() - target
    w_right = target - left.float()
    return (F.cross_entropy(logits, left, reduction="none") * w_left
            + F.cross_entropy(logits, right, reduction="none") * w_right)


def giou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """``1 - GIoU`` of matching boxes ``(K, 4)`` -> ``(K,)``."""
    return 1 - aligned_giou(pred, target)


def gfl_losses(
    cls: Tensor,
    reg: Tensor,
    points: Tensor,
    strides: Tensor,
    assignment: Assignment,
    gt_boxes: Tensor,
    gt_labels: Tensor,
    integral: torch.nn.Module,
    weights: dict[str, float],
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """GFL's QFL + GIoU + DFL for a batch.

    Args:
        cls: ``(B, A, C)`` class logits; reg: ``(B, A, 4, reg_max + 1)`` edge logits.
        points: ``(A, 2)``; strides: ``(A,)``; assignment: from :func:`distill.assigners.atss_assign`.
        gt_boxes: ``(B, G, 4)``; gt_labels: ``(B, G)`` (padding ignored through the assignment).
        weights: ``cls``, ``giou``, ``dfl`` loss weights (0 skips the term).
    Returns the weighted losses and the positives' decoded state (``pos``: flat indices, ``pos_weight``:
    max class score, ``pos_pred``/``pos_target`` boxes in stride units) for distillation terms to reuse.
    """
    b, a, num_classes = cls.shape
    reg_max = reg.shape[-1] - 1
    pos_b, pos_a = assignment.positive.nonzero(as_tuple=True)
    gt_idx = assignment.gt_index[pos_b, pos_a]
    num_pos = max(float(pos_b.numel()), 1.0)

    stride = strides[pos_a][:, None]
    centre = points[pos_a] / stride
    target_boxes = gt_boxes[pos_b, gt_idx] / stride
    pos_reg = reg[pos_b, pos_a]  # (P, 4, R+1)
    pred_boxes = distance_to_box(centre, integral(pos_reg))
    pos_cls = cls[pos_b, pos_a].detach()
    score_weight = pos_cls.sigmoid().max(1).values  # (P,)
    weight_sum = score_weight.sum().clamp(min=1e-6)

    labels = torch.full((b, a), num_classes, dtype=torch.long, device=cls.device)
    labels[pos_b, pos_a] = gt_labels[pos_b, gt_idx]
    quality = torch.zeros((b, a), dtype=torch.float32, device=cls.device)
    quality[pos_b, pos_a] = aligned_iou(pred_boxes.detach(), target_boxes).clamp(min=1e-6)

    losses: dict[str, Tensor] = {}
    if weights.get("cls", 1.0) > 0:
        qfl = quality_focal_loss(cls.reshape(b * a, -1).float(), labels.reshape(-1), quality.reshape(-1))
        losses["qfl"] = weights.get("cls", 1.0) * qfl.sum() / num_pos
    if weights.get("giou", 2.0) > 0:
        losses["giou"] = weights.get("giou", 2.0) * (giou_loss(pred_boxes, target_boxes) * score_weight).sum() \
            / weight_sum
    if weights.get("dfl", 0.25) > 0:
        target_dist = box_to_distance(centre, target_boxes, reg_max)  # (P, 4)
        dfl = distribution_focal_loss(pos_reg.reshape(-1, reg_max + 1), target_dist.reshape(-1)).reshape(-1, 4)
        losses["dfl"] = weights.get("dfl", 0.25) * (dfl.mean(1) * score_weight).sum() / weight_sum
    state = {"pos_b": pos_b, "pos_a": pos_a, "pos_weight": score_weight, "pos_pred": pred_boxes,
             "pos_target": target_boxes, "centre": centre, "num_pos": torch.tensor(num_pos)}
    return losses, state

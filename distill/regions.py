"""Where to distil: the Main region and the Valuable Localization Region (VLR) of the LD paper (algorithm 1).

- Main region: the assigner's positive locations.
- VLR: locations whose preset anchor has ``gamma * alpha_pos <= DIoU(anchor, gt) <= alpha_pos`` with some
  ground truth, ``alpha_pos`` being the assigner's positive threshold for that ground truth (ATSS: its
  adaptive mean + std). Among the ground truths a location qualifies for, the one with the highest DIoU
  wins; positives are excluded, so the two regions are disjoint. A VLR location is weighted by the IoU of
  its anchor with the matched ground truth.

Only boxes go in, no predictions, so any dense detector can use it: anchor-based heads pass their anchors,
anchor-free heads (GFL, FCOS) the preset square anchor around each point
(:func:`distill.locations.square_anchors`), which is used for nothing but finding the regions. All levels
are handled at once (the anchors of every level are concatenated); there is no loop over locations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distill.boxes import aligned_iou, pairwise_diou


@dataclass
class Regions:
    main: Tensor  # (B, A) bool: the assigner's positives
    vlr: Tensor  # (B, A) bool: the valuable localization region, disjoint from main
    vlr_weight: Tensor  # (B, A) float: IoU of the anchor with its VLR ground truth, 0 outside the VLR
    vlr_gt: Tensor  # (B, A) long: index of the VLR ground truth in the image's list, -1 outside the VLR


def find_regions(
    anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor, positive: Tensor, alpha_pos: Tensor, gamma: float
) -> Regions:
    """Main region and VLR of a batch.

    Args:
        anchors: ``(A, 4)`` preset anchors x1y1x2y2 of all levels, concatenated.
        gt_boxes: ``(B, G, 4)`` ground truths, padded; gt_valid: ``(B, G)`` bool, False for padding.
        positive: ``(B, A)`` bool, the assigner's positives (``Assignment.positive``).
        alpha_pos: ``(B, G)`` positive IoU threshold of each ground truth (``Assignment.threshold``).
        gamma: lower bound of the VLR as a fraction of ``alpha_pos``, in ``[0, 1]``.
    Returns :class:`Regions` with ``(B, A)`` tensors.
    """
    b, a = positive.shape
    if gt_boxes.shape[1] == 0:
        return Regions(
            positive,
            torch.zeros_like(positive),
            anchors.new_zeros((b, a)),
            torch.full((b, a), -1, dtype=torch.long, device=anchors.device),
        )
    diou = pairwise_diou(anchors[None].float(), gt_boxes.float())  # (B, A, G)
    alpha = alpha_pos[:, None, :].float()
    qualifies = (diou >= gamma * alpha) & (diou <= alpha) & gt_valid[:, None, :]
    best_gt = torch.where(qualifies, diou, torch.full_like(diou, -torch.inf)).argmax(-1)  # (B, A)
    vlr = qualifies.any(-1) & ~positive
    matched = gt_boxes.gather(1, best_gt[..., None].expand(-1, -1, 4)).float()  # (B, A, 4)
    weight = aligned_iou(anchors[None].float().expand_as(matched), matched) * vlr
    return Regions(positive, vlr, weight, torch.where(vlr, best_gt, torch.full_like(best_gt, -1)))

"""ATSS label assignment (Zhang et al. 2020), vectorised over the batch.

Per ground truth: take the ``topk`` locations per level whose anchor centres are closest to the box centre;
the IoU threshold ``alpha_pos`` is the mean + std of those candidates' anchor IoUs; candidates with
IoU >= alpha_pos whose centre lies inside the box are positive. A location positive for several boxes
takes the one it overlaps most. Matches mmdetection's ``ATSSAssigner``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distill.boxes import pairwise_iou


@dataclass
class Assignment:
    gt_index: Tensor  # (B, A) long: index into the image's ground truths, -1 for negatives
    positive: Tensor  # (B, A) bool
    threshold: Tensor  # (B, G) alpha_pos of each ground truth (0 for padding)
    iou: Tensor  # (B, A, G) anchor IoU with each ground truth (0 for padding)


def atss_assign(anchors: Tensor, counts: list[int], gt_boxes: Tensor, gt_valid: Tensor, topk: int = 9) -> Assignment:
    """Assign ``A`` locations to ground truths.

    Args:
        anchors: ``(A, 4)`` preset anchors, levels concatenated.
        counts: locations per level (sums to A).
        gt_boxes: ``(B, G, 4)`` ground truths, padded to the largest count in the batch.
        gt_valid: ``(B, G)`` bool, False for padding.
    """
    b, g = gt_valid.shape
    a = anchors.shape[0]
    if g == 0:
        zeros = anchors.new_zeros((b, a, 0))
        return Assignment(
            anchors.new_full((b, a), -1, dtype=torch.long),
            torch.zeros((b, a), dtype=torch.bool, device=anchors.device),
            anchors.new_zeros((b, 0)),
            zeros,
        )
    iou = pairwise_iou(anchors[None].expand(b, -1, -1), gt_boxes)  # (B, A, G)
    iou = iou * gt_valid[:, None, :]
    anchor_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2  # (A, 2)
    gt_ctr = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2  # (B, G, 2)
    dist = torch.cdist(anchor_ctr[None].expand(b, -1, -1), gt_ctr)  # (B, A, G)

    # Candidates: the topk closest locations of each level, as global location indices (B, K, G).
    candidates, start = [], 0
    for n in counts:
        k = min(topk, n)
        candidates.append(dist[:, start : start + n].topk(k, dim=1, largest=False).indices + start)
        start += n
    candidates = torch.cat(candidates, dim=1)
    cand_iou = iou.gather(1, candidates)  # (B, K, G)
    threshold = cand_iou.mean(1) + cand_iou.std(1)  # (B, G); unbiased std, as mmdetection
    is_pos = cand_iou >= threshold[:, None, :]

    # Centre of the candidate's location strictly inside the box (by more than 0.01 pixel).
    cand_ctr = anchor_ctr[candidates]  # (B, K, G, 2)
    lt = cand_ctr - gt_boxes[:, None, :, :2]
    rb = gt_boxes[:, None, :, 2:] - cand_ctr
    is_pos &= torch.cat([lt, rb], dim=-1).amin(-1) > 0.01
    is_pos &= gt_valid[:, None, :]

    pos_mask = torch.zeros_like(iou, dtype=torch.bool).scatter_(1, candidates, is_pos)  # (B, A, G)
    masked = torch.where(pos_mask, iou, torch.full_like(iou, -1.0))
    best, gt_index = masked.max(dim=2)
    positive = best >= 0
    gt_index = torch.where(positive, gt_index, torch.full_like(gt_index, -1))
    return Assignment(gt_index, positive, threshold * gt_valid, iou)

"""Label assignment of the dense detector families (DESIGN section 2), each vectorised over the batch.

- :func:`atss_assign` (GFL, GFocalV2, ATSS; Zhang et al. 2020): per ground truth, the ``topk`` anchors per
  level whose centres are closest to the box centre are candidates; the IoU threshold ``alpha_pos`` is the
  mean + std of the candidates' IoUs; candidates with IoU >= alpha_pos whose centre lies inside the box are
  positive. An anchor positive for several boxes takes the one it overlaps most. As mmdetection's
  ``ATSSAssigner``.
- :func:`max_iou_assign` (RetinaNet): IoU >= 0.5 positive, < 0.4 negative, between ignored, plus each box's
  best anchors (mmdetection's ``MaxIoUAssigner`` with ``match_low_quality``).
- :func:`fcos_assign` (FCOS): points inside the box's centre region (radius 1.5 strides) whose largest edge
  distance falls in their level's regression range; the smallest box wins.

All work per anchor: a head with several anchors per location passes every anchor (levels concatenated,
anchor-minor), with ``counts`` the anchors per level.
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
    # (B, A) bool: neither positive nor negative, left out of the classification loss (max-IoU only)
    ignore: Tensor | None = None


def atss_assign(
    anchors: Tensor, counts: list[int], gt_boxes: Tensor, gt_valid: Tensor, topk: int = 9, valid: Tensor | None = None
) -> Assignment:
    """Assign ``A`` locations to ground truths.

    Args:
        anchors: ``(A, 4)`` preset anchors, levels concatenated.
        counts: locations per level (sums to A).
        gt_boxes: ``(B, G, 4)`` ground truths, padded to the largest count in the batch.
        gt_valid: ``(B, G)`` bool, False for padding.
        valid: ``(B, A)`` bool, the locations inside each image (the batch's padding mask): the others are
            never candidates, as mmdetection drops anchors outside the image before assigning, so an image's
            assignment does not depend on the canvas it was batched on.
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
    if valid is not None:
        dist = dist.masked_fill(~valid[..., None], float("inf"))

    # Candidates: the topk closest locations of each level, as global location indices (B, K, G).
    candidates, start = [], 0
    for n in counts:
        k = min(topk, n)
        candidates.append(dist[:, start : start + n].topk(k, dim=1, largest=False).indices + start)
        start += n
    candidates = torch.cat(candidates, dim=1)
    cand_iou = iou.gather(1, candidates)  # (B, K, G)
    if valid is None:
        threshold = cand_iou.mean(1) + cand_iou.std(1)  # (B, G); unbiased std, as mmdetection
        is_pos = cand_iou >= threshold[:, None, :]
    else:  # statistics over the candidates inside the image only (a level may have fewer than topk there)
        inside = valid[:, :, None].expand_as(iou).gather(1, candidates).float()  # (B, K, G)
        n = inside.sum(1).clamp(min=1.0)
        mean = (cand_iou * inside).sum(1) / n
        std = (((cand_iou - mean[:, None]) * inside).pow(2).sum(1) / (n - 1).clamp(min=1.0)).sqrt()
        threshold = mean + std
        is_pos = (cand_iou >= threshold[:, None, :]) & inside.bool()

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


def max_iou_assign(
    anchors: Tensor,
    gt_boxes: Tensor,
    gt_valid: Tensor,
    pos_iou: float = 0.5,
    neg_iou: float = 0.4,
    valid: Tensor | None = None,
) -> Assignment:
    """RetinaNet's assignment of ``A`` anchors to ground truths.

    An anchor whose best IoU is ``>= pos_iou`` is positive for that box, ``< neg_iou`` negative, in between
    ignored. Then every box also takes the anchors that overlap it most (its best IoU, ties included), even
    below ``pos_iou``, so no box goes without a positive (mmdetection's ``match_low_quality`` with
    ``gt_max_assign_all``). Where mmdetection's ``min_pos_iou = 0`` lets a box that touches no anchor take
    every anchor (all tie at IoU 0), we require a best IoU above 0. An anchor that is the best of several
    boxes takes the one it overlaps most (mmdetection: the last box in the list). ``threshold`` is
    ``pos_iou`` for every real box: the VLR's ``alpha_pos``.

    Args:
        anchors: ``(A, 4)``; gt_boxes: ``(B, G, 4)`` padded; gt_valid: ``(B, G)`` bool, False for padding;
        valid: ``(B, A)`` bool, the anchors inside each image (the padding mask): the others overlap nothing.
    """
    b, g = gt_valid.shape
    a = anchors.shape[0]
    if g == 0:
        return Assignment(
            anchors.new_full((b, a), -1, dtype=torch.long),
            torch.zeros((b, a), dtype=torch.bool, device=anchors.device),
            anchors.new_zeros((b, 0)),
            anchors.new_zeros((b, a, 0)),
            torch.zeros((b, a), dtype=torch.bool, device=anchors.device),
        )
    iou = pairwise_iou(anchors[None].expand(b, -1, -1), gt_boxes) * gt_valid[:, None, :]  # (B, A, G)
    if valid is not None:
        iou = iou * valid[..., None]
    best, gt_index = iou.max(dim=2)  # (B, A)
    positive = best >= pos_iou
    # Each box's best anchors (IoU equal to the box's maximum, above 0) are positive for it.
    gt_best = iou.max(dim=1, keepdim=True).values  # (B, 1, G)
    is_best = (iou == gt_best) & (gt_best > 0) & gt_valid[:, None, :]
    low_quality = is_best.any(-1)
    low_gt = torch.where(is_best, iou, torch.full_like(iou, -1.0)).argmax(-1)
    gt_index = torch.where(positive, gt_index, low_gt)
    positive = positive | low_quality
    ignore = ~positive & (best >= neg_iou)
    gt_index = torch.where(positive, gt_index, torch.full_like(gt_index, -1))
    threshold = gt_valid.float() * pos_iou
    return Assignment(gt_index, positive, threshold, iou, ignore)


# FCOS's regression range of each FPN level (P3-P7), in input pixels: a level regresses the boxes whose
# largest edge distance from the point falls in its range.
FCOS_RANGES: tuple[tuple[float, float], ...] = (
    (-1.0, 64.0),
    (64.0, 128.0),
    (128.0, 256.0),
    (256.0, 512.0),
    (512.0, 1e8),
)


def fcos_assign(
    points: Tensor,
    strides: Tensor,
    counts: list[int],
    gt_boxes: Tensor,
    gt_valid: Tensor,
    radius: float = 1.5,
    ranges: tuple[tuple[float, float], ...] = FCOS_RANGES,
) -> Assignment:
    """FCOS's assignment of ``A`` points (Tian et al. 2019, with centre sampling as mmdetection's FCOS).

    A point is positive for a box when (1) it lies strictly inside the box's centre region: the square of
    half-side ``radius x stride`` around the box centre, clipped to the box; and (2) its largest distance to
    the box's four edges lies in its level's regression range ``[lo, hi]``. A point positive for several
    boxes takes the one of smallest area (first in the list on a tie). FCOS has no IoU threshold:
    ``threshold`` is 0 and ``iou`` empty (the criterion sets the VLR's ``alpha_pos``).

    Args:
        points: ``(A, 2)`` (x, y); strides: ``(A,)``; counts: points per level (sums to A, at most
            ``len(ranges)`` levels); gt_boxes: ``(B, G, 4)`` padded; gt_valid: ``(B, G)`` bool.
    """
    b, g = gt_valid.shape
    a = points.shape[0]
    if g == 0:
        return Assignment(
            points.new_full((b, a), -1, dtype=torch.long),
            torch.zeros((b, a), dtype=torch.bool, device=points.device),
            points.new_zeros((b, 0)),
            points.new_zeros((b, a, 0)),
        )
    bounds = torch.repeat_interleave(
        torch.tensor(ranges[: len(counts)], dtype=points.dtype, device=points.device),
        torch.tensor(counts, device=points.device),
        dim=0,
    )  # (A, 2)
    x, y = points[None, :, None, 0], points[None, :, None, 1]  # (1, A, 1)
    x1, y1, x2, y2 = (gt_boxes[:, None, :, i] for i in range(4))  # (B, 1, G) each
    distances = torch.stack([x - x1, y - y1, x2 - x, y2 - y], -1)  # (B, A, G, 4)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    r = (strides * radius)[None, :, None]  # (1, A, 1)
    centre = torch.stack(
        [
            x - torch.maximum(cx - r, x1),
            y - torch.maximum(cy - r, y1),
            torch.minimum(cx + r, x2) - x,
            torch.minimum(cy + r, y2) - y,
        ],
        -1,
    )  # (B, A, G, 4): distances to the clipped centre region
    largest = distances.amax(-1)
    ok = (centre.amin(-1) > 0) & (largest >= bounds[None, :, None, 0]) & (largest <= bounds[None, :, None, 1])
    ok &= gt_valid[:, None, :]
    area = ((x2 - x1) * (y2 - y1)).expand(b, a, g)
    smallest, gt_index = torch.where(ok, area, torch.full_like(area, torch.inf)).min(-1)
    positive = torch.isfinite(smallest)
    gt_index = torch.where(positive, gt_index, torch.full_like(gt_index, -1))
    return Assignment(gt_index, positive, points.new_zeros((b, g)), points.new_zeros((b, a, 0)))

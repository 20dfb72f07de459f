"""Where feature imitation looks (paper table 3): per FPN level, a ``(B, H_l, W_l)`` float mask in ``[0, 1]``.

Every mask is built from the same inputs the criterion already has: the level sizes and strides, the ground
truths (padded, with a ``valid`` flag), the preset anchors, the assigner's positives, and for GI the two
models' decoded predictions. A location is the centre of its cell, ``((x + 0.5) * s, (y + 0.5) * s)``, as in
:func:`distill.locations.grid_locations`, so a mask agrees with the locations the losses use.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, box_iou

Sizes = list[tuple[int, int]]


def level_points(sizes: Sizes, strides: list[int], device: torch.device) -> list[Tensor]:
    """The cell centres of each level, ``(H_l * W_l, 2)`` as (x, y) in input pixels, row-major."""
    out = []
    for (h, w), s in zip(sizes, strides, strict=True):
        ys, xs = torch.meshgrid(
            torch.arange(h, device=device, dtype=torch.float32),
            torch.arange(w, device=device, dtype=torch.float32),
            indexing="ij",
        )
        out.append(torch.stack([(xs.reshape(-1) + 0.5) * s, (ys.reshape(-1) + 0.5) * s], 1))
    return out


def inside_boxes(points: Tensor, boxes: Tensor, valid: Tensor) -> Tensor:
    """``points (P, 2)``, ``boxes (B, G, 4)``, ``valid (B, G)`` -> ``(B, P)`` bool: inside any valid box."""
    x, y = points[None, :, None, 0], points[None, :, None, 1]  # (1, P, 1)
    b = boxes[:, None]  # (B, 1, G, 4)
    inside = (x >= b[..., 0]) & (x <= b[..., 2]) & (y >= b[..., 1]) & (y <= b[..., 3]) & valid[:, None]
    return inside.any(-1)


def inside_gt_masks(sizes: Sizes, strides: list[int], boxes: Tensor, valid: Tensor) -> list[Tensor]:
    """Imitation inside the ground-truth boxes: 1 at the cells whose centre lies in a box, at each level's
    stride. ``boxes (B, G, 4)`` x1y1x2y2, ``valid (B, G)`` -> per level ``(B, H_l, W_l)``."""
    points = level_points(sizes, strides, boxes.device)
    return [inside_boxes(p, boxes, valid).float().reshape(-1, h, w) for p, (h, w) in zip(points, sizes, strict=True)]


def anchor_masks(flags: Tensor, sizes: Sizes, num_anchors: int) -> list[Tensor]:
    """Anchor flags ``(B, L*A)`` (anchor-minor, levels concatenated) -> per level location masks
    ``(B, H_l, W_l)``: a location counts when any of its ``num_anchors`` anchors is flagged."""
    per_location = flags.reshape(flags.shape[0], -1, num_anchors).any(-1).float()
    counts = [h * w for h, w in sizes]
    return [m.reshape(-1, h, w) for m, (h, w) in zip(per_location.split(counts, 1), sizes, strict=True)]


def main_region_masks(positive: Tensor, sizes: Sizes, num_anchors: int = 1) -> list[Tensor]:
    """Imitation in the Main distillation region: the assigner's positives ``(B, L*A)`` bool, per level."""
    return anchor_masks(positive, sizes, num_anchors)


def fine_grained_masks(
    anchors: Tensor, sizes: Sizes, boxes: Tensor, valid: Tensor, num_anchors: int = 1, psi: float = 0.5
) -> list[Tensor]:
    """Fine-grained imitation (Wang et al., CVPR 2019): the locations near an object, those with an anchor
    whose IoU with a ground truth exceeds ``psi`` times that ground truth's best IoU over all anchors (all
    levels), so every object contributes its own neighbourhood whatever its size.

    ``anchors (L*A, 4)`` the model's preset anchors, ``boxes (B, G, 4)``, ``valid (B, G)`` -> per level
    ``(B, H_l, W_l)``."""
    flags = torch.zeros((boxes.shape[0], anchors.shape[0]), dtype=torch.bool, device=boxes.device)
    for i in range(boxes.shape[0]):
        gts = boxes[i][valid[i]]
        if gts.numel() == 0:
            continue
        iou = box_iou(anchors, gts)  # (L*A, G_i)
        best = iou.max(0, keepdim=True).values  # (1, G_i)
        flags[i] = ((iou > psi * best) & (best > 0)).any(1)
    return anchor_masks(flags, sizes, num_anchors)


def general_instances(
    t_scores: Tensor,
    s_scores: Tensor,
    t_boxes: Tensor,
    s_boxes: Tensor,
    top_k: int = 10,
    nms_iou: float = 0.3,
    valid: Tensor | None = None,
) -> list[Tensor]:
    """General instances (Dai et al., CVPR 2021): per image, the anchors where the teacher and the student
    disagree most, ``GI = max_c |p_T - p_S|``, each with the box of whichever model is the more confident
    there; NMS at ``nms_iou`` keeps one per instance and the ``top_k`` best remain.

    ``t_scores, s_scores (B, N, C)`` probabilities, ``t_boxes, s_boxes (B, N, 4)`` decoded, in input pixels ->
    per image ``(K_i, 4)`` boxes, ``K_i <= top_k``; ``valid (B, N)``: only these anchors are candidates (the
    padding mask). Computed without gradients (it only selects where to look)."""
    out = []
    with torch.no_grad():
        for i, (ts, ss, tb, sb) in enumerate(zip(t_scores, s_scores, t_boxes, s_boxes, strict=True)):
            gi = (ts - ss).abs().max(1).values  # (N,)
            boxes = torch.where((ts.max(1).values >= ss.max(1).values)[:, None], tb, sb)
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            if valid is not None:
                keep &= valid[i]
            boxes, gi = boxes[keep], gi[keep]
            # Only the best candidates reach NMS: its cost grows with the square of their number.
            pre = gi.topk(min(gi.numel(), 10 * top_k)).indices
            kept = batched_nms(boxes[pre], gi[pre], torch.zeros_like(pre), nms_iou)[:top_k]
            out.append(boxes[pre][kept])
    return out


def gi_masks(sizes: Sizes, strides: list[int], instances: list[Tensor]) -> list[Tensor]:
    """Imitation inside the general instances' boxes (``general_instances``), per level ``(B, H_l, W_l)``."""
    g = max((len(b) for b in instances), default=0)
    device = instances[0].device if instances else torch.device("cpu")
    boxes = torch.zeros((len(instances), g, 4), device=device)
    valid = torch.zeros((len(instances), g), dtype=torch.bool, device=device)
    for i, b in enumerate(instances):
        boxes[i, : len(b)], valid[i, : len(b)] = b, True
    return inside_gt_masks(sizes, strides, boxes, valid)

"""Box arithmetic shared by the assigner, the losses, the regions and the decoder.

Boxes are ``(..., 4)`` tensors ``x1, y1, x2, y2``; distances are ``(..., 4)`` ``left, top, right, bottom``
from a location's centre. One intersection routine (:func:`_overlap`) and one enclosing-box routine
(:func:`_enclosing`) serve IoU, GIoU and DIoU, both for matching rows ("aligned") and for every pair
("pairwise", by broadcasting ``(..., N, 1, 4)`` against ``(..., 1, M, 4)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-7


def _overlap(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union areas of ``a (..., 4)`` and ``b (..., 4)``, broadcast against each other -> both
    ``(...)``. Degenerate boxes (x2 < x1) have area 0."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[..., 2:] - a[..., :2]).clamp(min=0).prod(-1)
    area_b = (b[..., 2:] - b[..., :2]).clamp(min=0).prod(-1)
    return inter, area_a + area_b - inter


def _enclosing(a: Tensor, b: Tensor) -> Tensor:
    """Width and height ``(..., 2)`` of the smallest box enclosing ``a (..., 4)`` and ``b (..., 4)``."""
    return torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])


def _pairs(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """``a (..., N, 4)``, ``b (..., M, 4)`` -> views ``(..., N, 1, 4)`` and ``(..., 1, M, 4)`` that broadcast to
    every pair."""
    return a[..., :, None, :], b[..., None, :, :]


def aligned_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of matching rows of ``a (..., 4)`` and ``b (..., 4)`` -> ``(...)``."""
    inter, union = _overlap(a, b)
    return inter / union.clamp(min=EPS)


def aligned_giou(a: Tensor, b: Tensor) -> Tensor:
    """Generalised IoU of matching rows of ``a (..., 4)`` and ``b (..., 4)`` -> ``(...)``."""
    inter, union = _overlap(a, b)
    union = union.clamp(min=EPS)
    enclose = _enclosing(a, b).prod(-1)
    return inter / union - (enclose - union) / enclose.clamp(min=EPS)


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of every box in ``a (..., N, 4)`` with every box in ``b (..., M, 4)`` -> ``(..., N, M)``."""
    return aligned_iou(*_pairs(a, b))


def pairwise_diou(a: Tensor, b: Tensor) -> Tensor:
    """True Distance-IoU ``IoU - rho^2 / c^2`` of every box in ``a (..., N, 4)`` with ``b (..., M, 4)``.

    ``rho`` is the distance between the box centres and ``c`` the diagonal of the smallest box enclosing
    both. (The reference LD code divides the intersection by the anchor's area instead of the union; we
    use the real IoU.) Returns ``(..., N, M)`` in ``[-1, 1]``.
    """
    a, b = _pairs(a, b)
    iou = aligned_iou(a, b)
    rho2 = (((a[..., :2] + a[..., 2:]) / 2 - (b[..., :2] + b[..., 2:]) / 2) ** 2).sum(-1)
    c2 = (_enclosing(a, b) ** 2).sum(-1).clamp(min=EPS)
    return iou - rho2 / c2


def distance_to_box(points: Tensor, distances: Tensor) -> Tensor:
    """``points (..., 2)`` and ``distances (..., 4)`` (l, t, r, b) -> boxes ``(..., 4)``."""
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def box_to_distance(points: Tensor, boxes: Tensor, max_distance: float | None = None) -> Tensor:
    """Inverse of :func:`distance_to_box`; optionally clamped to ``[0, max_distance - 0.01]`` (DFL range)."""
    d = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)
    if max_distance is not None:
        d = d.clamp(min=0, max=max_distance - 0.01)
    return d

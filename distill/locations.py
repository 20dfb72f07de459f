"""Locations of a dense head: one point per feature-map cell, and the preset anchors around it.

Points sit at ``(x * stride, y * stride)`` (mmdetection's prior generator with ``center_offset = 0``), so
outputs match mmdetection's GFL exactly. One-anchor families (GFL, GFocalV2, ATSS, FCOS) have one square
anchor per point, which exists only for label assignment and for finding the VLR; RetinaNet has nine
(:func:`retina_anchors`), each with its own outputs. Every family measures box edges from the point.
"""

from __future__ import annotations

import torch
from torch import Tensor

ANCHOR_SCALE = 8  # anchor side = 8 x stride (GFL/ATSS "octave_base_scale")
# RetinaNet's anchors (mmdetection's ``AnchorGenerator`` for RetinaNet): octave base 4, three scales per
# octave, ratios h/w of 0.5, 1 and 2.
RETINA_OCTAVE_BASE = 4
RETINA_SCALES_PER_OCTAVE = 3
RETINA_RATIOS = (0.5, 1.0, 2.0)
RETINA_ANCHORS = RETINA_SCALES_PER_OCTAVE * len(RETINA_RATIOS)


def grid_locations(
    feature_sizes: list[tuple[int, int]], strides: list[int], device: torch.device | None = None
) -> tuple[Tensor, Tensor, list[int]]:
    """Points of all levels, flattened level by level in row-major order.

    Returns ``points (A, 2)`` as (x, y) in input pixels, ``stride (A,)`` and the number of locations
    per level (sums to A).
    """
    points, point_strides, counts = [], [], []
    for (h, w), s in zip(feature_sizes, strides, strict=True):
        ys, xs = torch.meshgrid(
            torch.arange(h, device=device, dtype=torch.float32) * s,
            torch.arange(w, device=device, dtype=torch.float32) * s,
            indexing="ij",
        )
        points.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1))
        point_strides.append(torch.full((h * w,), float(s), device=device))
        counts.append(h * w)
    return torch.cat(points), torch.cat(point_strides), counts


def square_anchors(points: Tensor, strides: Tensor, scale: float = ANCHOR_SCALE) -> Tensor:
    """``points (A, 2)``, ``strides (A,)`` -> anchors ``(A, 4)`` of side ``scale * stride``."""
    half = (strides * scale / 2)[:, None]
    return torch.cat([points - half, points + half], dim=-1)


def retina_anchor_sizes() -> Tensor:
    """The nine anchors' ``(w, h)`` in stride units, ``(9, 2)``, in mmdetection's ``AnchorGenerator`` order
    (``scale_major``: index = ratio * 3 + scale): side ``4 * 2^(i/3)``, width / sqrt(ratio), height x sqrt(ratio)."""
    scales = RETINA_OCTAVE_BASE * 2 ** (torch.arange(RETINA_SCALES_PER_OCTAVE, dtype=torch.float32) / 3)
    h_ratios = torch.tensor(RETINA_RATIOS).sqrt()
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    return torch.stack([ws, hs], dim=-1)


def retina_anchors(points: Tensor, strides: Tensor) -> Tensor:
    """``points (L*9, 2)``, ``strides (L*9,)``, each location repeated nine times (anchor-minor, as
    ``Detector.locations`` gives them) -> RetinaNet's anchors ``(L*9, 4)`` x1y1x2y2 around each point."""
    sizes = retina_anchor_sizes().to(points.device).repeat(points.shape[0] // RETINA_ANCHORS, 1)
    half = sizes * strides[:, None] / 2
    return torch.cat([points - half, points + half], dim=-1)

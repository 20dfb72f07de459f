"""Locations of a dense head: one point per feature-map cell, and the preset square anchor around it.

Points sit at ``(x * stride, y * stride)`` (mmdetection's prior generator with ``center_offset = 0``), so
outputs match mmdetection's GFL exactly. Anchors exist only for label assignment and for finding the VLR.
"""

from __future__ import annotations

import torch
from torch import Tensor

ANCHOR_SCALE = 8  # anchor side = 8 x stride (GFL/ATSS "octave_base_scale")


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

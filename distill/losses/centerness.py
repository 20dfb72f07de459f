"""Centerness (Tian et al. 2019): how central a location is in its box; the target of FCOS's and ATSS's
quality branch, whose sigmoid multiplies the class scores at inference."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def centerness_target(distances: Tensor) -> Tensor:
    """``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` of edge distances ``(K, 4)`` (l, t, r, b, any
    unit, >= 0) -> ``(K,)`` in ``[0, 1]``: 1 at the box centre, 0 on an edge."""
    lr, tb = distances[:, 0::2], distances[:, 1::2]
    ratio = lr.amin(1) / lr.amax(1).clamp(min=1e-6) * tb.amin(1) / tb.amax(1).clamp(min=1e-6)
    return ratio.clamp(min=0).sqrt()


def centerness_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Binary cross-entropy of the centerness ``logits (K,)`` against ``target (K,)`` -> ``(K,)``."""
    return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")

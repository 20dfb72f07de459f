"""The one reduction of every distillation term: a weighted mean over its region, DDP-aware."""

from __future__ import annotations

from torch import Tensor

from distill.ddp import mean_denominator


def weighted_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    """``sum(w * v) / sum(w)`` over rows ``(K,)`` (a plain mean without weights); 0, still differentiable,
    when the region is empty. Over several processes the divisor is the global batch's
    (:func:`distill.ddp.mean_denominator`): every rank must call this for every enabled term, even when its
    own region is empty."""
    if weights is None:
        return values.sum() / mean_denominator(values.new_tensor(float(values.shape[0])), 1.0)
    return (values * weights).sum() / mean_denominator(weights.sum(), 1e-6)

"""Feature imitation on the FPN levels (paper table 3, and PKD): terms between the student's FPN features
(through a 1x1 adapter per level when the widths differ) and the teacher's, each on its own region.

- ``fitnets``: the whole maps (Romero et al. 2015), mean over the levels of each level's MSE;
- ``inside_gt``: inside the ground-truth boxes at each level's stride;
- ``main_region``: in the Main distillation region (the assigner's positives);
- ``fine_grained``: near the anchors whose IoU with a box exceeds half that box's best (Wang et al. 2019);
- ``defeat``: inside and outside the boxes separately, each a mean over its own region, weighted
  ``DEFEAT_FG`` and ``DEFEAT_BG`` (Guo et al. 2021: decoupling keeps the far larger background from swamping
  the objects, while still teaching it);
- ``gi``: inside the general instances, where teacher and student disagree most (Dai et al. 2021);
- ``pkd``: MSE of features normalised per channel to zero mean and unit variance, i.e. one minus their
  Pearson correlation (Cao et al. 2022); scale-free, so a teacher with larger activations does not dominate.

The masked terms are location-weighted means over all levels (:func:`distill.losses.reduce.weighted_mean`), so
the object count and the batch size do not change their scale, and an empty region gives 0. The regions are
built by :mod:`distill.losses.imitation_masks`. The teacher side is always detached.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses.reduce import weighted_mean
from distill.spec import IMITATION_TERMS

# The terms restricted to a region (a mask per level); fitnets and pkd take the whole maps.
MASKED_TERMS = ("inside_gt", "main_region", "fine_grained", "gi")
DEFEAT_FG, DEFEAT_BG = 1.0, 0.5


def imitation_weights(weight: Callable[[str], float]) -> dict[str, float]:
    """The imitation terms switched on (weight > 0), by name."""
    return {name: weight(name) for name in IMITATION_TERMS if weight(name) > 0}


def build_adapters(student_channels: int, teacher_channels: int, num_levels: int) -> nn.ModuleList | None:
    """One 1x1 conv per FPN level from the student's width to the teacher's, only when they differ. Trained
    with the student (optimiser and checkpoint), never part of the exported detector."""
    if student_channels == teacher_channels:
        return None
    return nn.ModuleList(nn.Conv2d(student_channels, teacher_channels, 1) for _ in range(num_levels))


def adapt(s_feats: list[Tensor], adapters: nn.ModuleList | None) -> list[Tensor]:
    """The student's levels ``(B, C_S, H_l, W_l)`` in the teacher's width ``(B, C_T, H_l, W_l)``, float32."""
    if adapters is None:
        return [s.float() for s in s_feats]
    return [a(s.float()) for s, a in zip(s_feats, adapters, strict=True)]


def _per_location(s: Tensor, t: Tensor) -> Tensor:
    """Mean squared difference over the channels: ``(B, C, H, W)`` x2 -> ``(B * H * W,)``."""
    return (s - t.detach().float()).pow(2).mean(1).reshape(-1)


def masked_mse(s_feats: list[Tensor], t_feats: list[Tensor], masks: list[Tensor]) -> Tensor:
    """The MSE per location, averaged over the locations of ``masks`` (per level ``(B, H_l, W_l)``, weights in
    ``[0, 1]``) on all levels together; 0 when every mask is empty."""
    values = torch.cat([_per_location(s, t) for s, t in zip(s_feats, t_feats, strict=True)])
    weights = torch.cat([m.reshape(-1).float() for m in masks])
    return weighted_mean(values, weights)


def fitnets_loss(s_feats: list[Tensor], t_feats: list[Tensor], valid: list[Tensor] | None = None) -> Tensor:
    """MSE between the (adapted) student's and the teacher's FPN levels, averaged over the levels; with
    ``valid`` (per level ``(B, H_l, W_l)``, the padding mask), over the unpadded locations of all levels."""
    if valid is not None:
        return masked_mse(s_feats, t_feats, valid)
    return torch.stack([F.mse_loss(s, t.detach().float()) for s, t in zip(s_feats, t_feats, strict=True)]).mean()


def defeat_loss(
    s_feats: list[Tensor], t_feats: list[Tensor], fg_masks: list[Tensor], valid: list[Tensor] | None = None
) -> Tensor:
    """``DEFEAT_FG x`` the MSE inside the boxes + ``DEFEAT_BG x`` the MSE outside them (and inside the image:
    ``valid``), each a mean over its own locations (per level ``(B, H_l, W_l)`` masks)."""
    fg = masked_mse(s_feats, t_feats, fg_masks)
    inside_image = valid if valid is not None else [torch.ones_like(m) for m in fg_masks]
    outside = [v.float() * (1.0 - m) for v, m in zip(inside_image, fg_masks, strict=True)]
    return DEFEAT_FG * fg + DEFEAT_BG * masked_mse(s_feats, t_feats, outside)


def channel_normalise(x: Tensor, valid: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """``(B, C, H, W)`` -> the same, each channel at zero mean and unit variance over the batch and space (over
    the locations of ``valid (B, H, W)`` only, when given: padding does not shift the statistics)."""
    if valid is None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        return (x - mean) / (std + eps)
    w = valid.float()[:, None]  # (B, 1, H, W)
    n = w.sum().clamp(min=1.0)
    mean = (x * w).sum(dim=(0, 2, 3), keepdim=True) / n
    var = ((x - mean).pow(2) * w).sum(dim=(0, 2, 3), keepdim=True) / n
    return (x - mean) / (var.sqrt() + eps)


def pkd_loss(s_feats: list[Tensor], t_feats: list[Tensor], valid: list[Tensor] | None = None) -> Tensor:
    """Pearson-correlation imitation: half the MSE of the channel-normalised features, averaged over the
    levels; ``1 - r`` per channel up to the factor, so 0 for features equal up to a per-channel affine map.
    With ``valid`` (the padding mask per level), statistics and errors are over the unpadded locations."""
    if valid is None:
        terms = [
            F.mse_loss(channel_normalise(s), channel_normalise(t.detach().float())) / 2
            for s, t in zip(s_feats, t_feats, strict=True)
        ]
        return torch.stack(terms).mean()
    terms = []
    for s, t, v in zip(s_feats, t_feats, valid, strict=True):
        diff = (channel_normalise(s, v) - channel_normalise(t.detach().float(), v)).pow(2).mean(1)  # (B, H, W)
        terms.append((diff * v.float()).sum() / v.float().sum().clamp(min=1.0) / 2)
    return torch.stack(terms).mean()


def imitation_losses(
    weights: dict[str, float],
    s_feats: list[Tensor],
    t_feats: list[Tensor],
    adapters: nn.ModuleList | None,
    masks: Callable[[str], list[Tensor]],
    valid: list[Tensor] | None = None,
) -> dict[str, Tensor]:
    """The weighted imitation terms of ``weights`` (:func:`imitation_weights`). ``masks(name)`` gives a masked
    term's region per level (``"inside_gt"`` also serves DeFeat); only the regions of enabled terms are built.
    ``valid``: the padding mask per level ``(B, H_l, W_l)``; the whole-map terms (FitNets, PKD, DeFeat's
    background) then look at the images only, never at the padding."""
    s = adapt(s_feats, adapters)
    out: dict[str, Tensor] = {}
    for name, w in weights.items():
        if name == "fitnets":
            out[name] = w * fitnets_loss(s, t_feats, valid)
        elif name == "pkd":
            out[name] = w * pkd_loss(s, t_feats, valid)
        elif name == "defeat":
            out[name] = w * defeat_loss(s, t_feats, masks("inside_gt"), valid)
        else:
            out[name] = w * masked_mse(s, t_feats, masks(name))
    return out

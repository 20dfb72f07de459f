"""Distillation losses on a dense head's outputs: Localization Distillation (LD) on edge distributions and
Hinton KD on independent sigmoid classifiers.

``ld_loss`` and ``sigmoid_kd_loss`` return one value per row, before any weighting or reduction;
``region_ld`` and ``region_kd`` are their weighted means over a region (the Main region or the VLR). The
teacher side is always detached, so the teacher never receives a gradient even if its outputs were computed
with autograd on.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distill.losses.reduce import weighted_mean


def ld_loss(student_logits: Tensor, teacher_logits: Tensor, tau: float = 10.0) -> Tensor:
    """Localization distillation of one edge (paper eq. 2-4).

    ``KL( softmax(z_T / tau) || softmax(z_S / tau) ) * tau^2``, a true KL: summed over the bins (the
    reference code averages over them, which only rescales the weight by ``1 / (reg_max + 1)``). The
    ``tau^2`` keeps the gradient's size independent of ``tau`` (Hinton et al.).

    Args:
        student_logits: ``(M, reg_max + 1)`` edge logits of the student.
        teacher_logits: ``(M, reg_max + 1)`` edge logits of the teacher (detached here).
        tau: temperature, > 0.
    Returns ``(M,)``, >= 0, exactly 0 where the logits match.
    """
    log_p_s = F.log_softmax(student_logits.float() / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / tau, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1) * tau**2


def sigmoid_kd_loss(student_logits: Tensor, teacher_logits: Tensor, tau: float = 2.0) -> Tensor:
    """Classification KD for a classifier of independent sigmoids.

    Each class is a Bernoulli variable: ``q = sigmoid(z_T / tau)``, ``p = sigmoid(z_S / tau)``, and the loss
    is ``sum_c KL(Bern(q_c) || Bern(p_c)) * tau^2``, the KL of the joint distribution of the independent
    classes. A softmax across classes (the reference code) would be meaningless for GFL, whose classes
    are not exclusive, and constant for a single class; this works with any number of classes.

    Args:
        student_logits: ``(M, C)``; teacher_logits: ``(M, C)`` (detached here); tau: temperature, > 0.
    Returns ``(M,)``, >= 0, exactly 0 where the logits match.
    """
    zs = student_logits.float() / tau
    zt = teacher_logits.detach().float() / tau
    q = zt.sigmoid()
    # BCE(z_S, q) - BCE(z_T, q) = cross-entropy - entropy = KL, both terms in the stable logits form.
    kl = F.binary_cross_entropy_with_logits(zs, q, reduction="none") - F.binary_cross_entropy_with_logits(
        zt, q, reduction="none"
    )
    return kl.sum(-1).clamp(min=0) * tau**2  # clamp: rounding only, the KL itself is >= 0


def region_ld(s_reg: Tensor, t_reg: Tensor, b: Tensor, a: Tensor, weights: Tensor | None, tau: float) -> Tensor:
    """Mean LD per edge over a region: ``s_reg``, ``t_reg`` ``(B, A, 4, R + 1)``, locations ``(b, a)`` each
    ``(K,)``, optional per-location weights ``(K,)``."""
    bins = s_reg.shape[-1]
    per_edge = ld_loss(s_reg[b, a].reshape(-1, bins), t_reg[b, a].reshape(-1, bins), tau).reshape(-1, 4)
    return weighted_mean(per_edge.mean(1), weights)


def region_kd(
    s_cls: Tensor,
    t_cls: Tensor,
    b: Tensor,
    a: Tensor,
    weights: Tensor | None,
    tau: float,
    columns: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Mean Bernoulli KD per location over a region: ``s_cls (B, A, C_S)``, ``t_cls (B, A, C_T)``, locations
    ``(b, a)``. ``columns``: the student's and the teacher's class indices ``(M,)`` that KD pairs (student
    column ``columns[0][i]`` learns from teacher column ``columns[1][i]``); None pairs every column with the
    same one (same classes, same order)."""
    s, t = s_cls[b, a], t_cls[b, a]  # (K, C_S), (K, C_T)
    if columns is not None:
        s, t = s[:, columns[0]], t[:, columns[1]]
    return weighted_mean(sigmoid_kd_loss(s, t, tau), weights)

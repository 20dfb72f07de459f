"""Distillation losses on a dense head's outputs: Localization Distillation (LD) on edge distributions and
Hinton KD on independent sigmoid classifiers.

Both return one value per row, before any weighting or reduction; the teacher side is always detached, so
the teacher never receives a gradient even if its outputs were computed with autograd on.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


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
    kl = F.binary_cross_entropy_with_logits(zs, q, reduction="none") \
        - F.binary_cross_entropy_with_logits(zt, q, reduction="none")
    return kl.sum(-1).clamp(min=0) * tau**2  # clamp: rounding only, the KL itself is >= 0

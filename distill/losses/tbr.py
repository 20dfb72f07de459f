"""Teacher-bounded regression (TBR), offered for comparison (paper section 4.2, eq. 6)."""

from __future__ import annotations

from torch import Tensor, nn

from distill.boxes import distance_to_box
from distill.losses.gfl import Positives, giou_loss
from distill.losses.reduce import weighted_mean


def tbr_loss(t_reg: Tensor, pos: Positives, integral: nn.Module, margin: float) -> Tensor:
    """Teacher-bounded pseudo box regression on the Main region (paper eq. 6, after Chen et al. 2017):
    the GIoU loss between the student's box and the teacher's box, active only where the student is
    farther from the ground truth than the teacher, ``||b_s - b||^2 + margin > ||b_t - b||^2`` (squared
    L2 of the corners in stride units). ``t_reg (B, A, 4, R + 1)``; ``integral``: the student's
    :class:`distill.models.gfl.Integral` (the teacher has the same ``reg_max``). Mean over the Main region."""
    t_box = distance_to_box(pos.centre, integral(t_reg[pos.b, pos.a].detach()))  # (P, 4)
    active = ((pos.pred.detach() - pos.target).pow(2).sum(1) + margin > (t_box - pos.target).pow(2).sum(1)).float()
    return weighted_mean(giou_loss(pos.pred, t_box) * active, None)

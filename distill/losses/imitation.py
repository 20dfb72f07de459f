"""Feature imitation on the FPN levels (paper table 3): terms between adapted student and teacher features,
and the 1x1 adapters that map the student's widths to the teacher's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.models.gfl import GFL
from distill.spec import DistillSpec


def needs_features(spec: DistillSpec) -> bool:
    """Whether the step must keep FPN features (only FitNets imitates them)."""
    return spec.weights.value("fitnets") > 0


def build_adapters(student: GFL, teacher: GFL, spec: DistillSpec) -> nn.Module | None:
    """FitNets' regressors: one 1x1 conv per FPN level from the student's channels to the teacher's.
    Trained with the student (optimiser and checkpoint) but not part of the exported detector."""
    if not needs_features(spec):
        return None
    return nn.ModuleList(nn.Conv2d(student.cfg.channels, teacher.cfg.channels, 1) for _ in student.strides)


def fitnets_loss(s_feats: list[Tensor], t_feats: list[Tensor], adapters: nn.Module) -> Tensor:
    """Mean squared error between adapted student and teacher FPN levels ``(B, channels, H_l, W_l)``,
    averaged over the levels."""
    terms = [
        F.mse_loss(adapt(s.float()), t.detach().float()) for s, t, adapt in zip(s_feats, t_feats, adapters, strict=True)
    ]
    return torch.stack(terms).mean()

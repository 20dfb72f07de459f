"""GFocalV2's head (Li et al. 2021): GFL plus the distribution-guided quality predictor (DGQP).

The DGQP reads how sharp each edge's distribution is: per edge the top-4 probabilities of its softmax and
their mean (4 x 5 = 20 numbers) -> 1x1 conv to 64 -> ReLU -> 1x1 conv to 1. Its sigmoid multiplies the
classification score (the product is what QFL trains and what inference ranks). Keys follow the authors'
code (``bbox_head.reg_conf.0|2``) less the final Sigmoid module: the head returns the logit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.models.head import DenseHead

TOPK = 4
DGQP_CHANNELS = 64


class GFLV2Head(DenseHead):
    has_quality = True

    def __init__(self, num_classes: int, channels: int, stacked_convs: int, reg_max: int, num_levels: int):
        super().__init__(num_classes, channels, stacked_convs, reg_max, num_levels)
        self.reg_conf = nn.Sequential(
            nn.Conv2d(4 * (TOPK + 1), DGQP_CHANNELS, 1), nn.ReLU(inplace=True), nn.Conv2d(DGQP_CHANNELS, 1, 1)
        )
        self.init_weights()

    def quality(self, reg_feat: Tensor, reg: Tensor) -> Tensor:
        """``reg (N, 4*(R+1), H, W)`` logits -> DGQP logits ``(N, 1, H, W)`` (``reg_feat`` is unused: the
        quality comes from the distributions alone)."""
        n, _, h, w = reg.shape
        prob = F.softmax(reg.reshape(n, 4, self.reg_max + 1, h, w), dim=2)
        top = prob.topk(TOPK, dim=2).values
        stat = torch.cat([top, top.mean(dim=2, keepdim=True)], dim=2)
        return self.reg_conf(stat.reshape(n, 4 * (TOPK + 1), h, w))

"""FCOS's (Tian et al. 2019) and ATSS's (Zhang et al. 2020) head: one location per cell and a centerness
branch on the regression tower, whose sigmoid multiplies the class scores at inference.

The two heads are the same network; they differ in how training assigns positives (centre sampling and
regression ranges for FCOS, the ATSS assigner for ATSS, both in the family's criterion), and in their
predictors' names, which follow mmdetection's ``FCOSHead`` (``conv_cls``, ``conv_reg``, ``conv_centerness``)
and ``ATSSHead`` (``atss_cls``, ``atss_reg``, ``atss_centerness``) so a checkpoint says its family.
"""

from __future__ import annotations

from torch import Tensor, nn

from distill.models.head import DenseHead


class CenternessHead(DenseHead):
    has_quality = True
    ctr_name = "conv_centerness"

    def __init__(self, num_classes: int, channels: int, stacked_convs: int, reg_max: int, num_levels: int):
        super().__init__(num_classes, channels, stacked_convs, reg_max, num_levels)
        setattr(self, self.ctr_name, nn.Conv2d(channels, self.num_anchors, 3, padding=1))
        self.init_weights()

    def quality(self, reg_feat: Tensor, reg: Tensor) -> Tensor:
        """``reg_feat (N, channels, H, W)`` -> centerness logits ``(N, 1, H, W)``."""
        return getattr(self, self.ctr_name)(reg_feat)


class FCOSHead(CenternessHead):
    cls_name, reg_name, ctr_name = "conv_cls", "conv_reg", "conv_centerness"


class ATSSHead(CenternessHead):
    cls_name, reg_name, ctr_name = "atss_cls", "atss_reg", "atss_centerness"

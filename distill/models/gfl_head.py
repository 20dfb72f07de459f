"""GFL's head (Li et al. 2020): QFL classification and edge distributions, mmdetection's ``GFLHead`` layout
(``bbox_head.cls_convs.i.conv|gn``, ``gfl_cls``, ``gfl_reg``, ``scales.i.scale``), so an mmdetection GFL
checkpoint is this head's state dict."""

from __future__ import annotations

from distill.models.head import DenseHead


class GFLHead(DenseHead):
    """One anchor per location, no quality branch: the class score is the IoU-aware quality (QFL)."""

    def __init__(self, num_classes: int, channels: int, stacked_convs: int, reg_max: int, num_levels: int):
        super().__init__(num_classes, channels, stacked_convs, reg_max, num_levels)
        self.init_weights()

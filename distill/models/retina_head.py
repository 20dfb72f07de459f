"""RetinaNet's head (Lin et al. 2017) as the LD authors distil it: A = 9 anchors per location (3 scales x 3
ratios, ``distill.locations.retina_anchors``), each with its own class logits and its own four edge
distributions, measured from the anchors' shared centre. Predictors named as mmdetection's ``RetinaHead``
(``retina_cls``, ``retina_reg``); the towers are the shared GN towers."""

from __future__ import annotations

from distill.locations import RETINA_ANCHORS
from distill.models.head import DenseHead


class RetinaHead(DenseHead):
    cls_name = "retina_cls"
    reg_name = "retina_reg"
    num_anchors = RETINA_ANCHORS

    def __init__(self, num_classes: int, channels: int, stacked_convs: int, reg_max: int, num_levels: int):
        super().__init__(num_classes, channels, stacked_convs, reg_max, num_levels)
        self.init_weights()

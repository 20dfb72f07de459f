"""What every family's head shares (DESIGN section 2): two towers of conv-GN-ReLU, a classification and a
box-distribution predictor, a learnt scale per FPN level and the integral that turns edge distributions
into distances. A family's head (``gfl_head``, ``gflv2_head``, ``retina_head``, ``fcos_head``) names its
predictors as mmdetection does, sets its anchors per location and adds a quality branch where it has one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Scale(nn.Module):
    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class Integral(nn.Module):
    """Expected value of a discrete distribution over ``0, 1, ..., reg_max``: the edge distance."""

    def __init__(self, reg_max: int):
        super().__init__()
        self.register_buffer("project", torch.linspace(0, reg_max, reg_max + 1))

    def forward(self, logits: Tensor) -> Tensor:
        """``logits (..., reg_max + 1)`` -> distances ``(...)`` in stride units."""
        return F.softmax(logits.float(), dim=-1) @ self.project


class ConvGNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        # mmdetection's GN(32); narrow test models keep >= 2 channels per group, since a group of a single
        # channel on a 1x1 map (P7 of a small image) has nothing to normalise.
        self.gn = nn.GroupNorm(min(groups, cout // 2), cout)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.gn(self.conv(x)), inplace=True)


class DenseHead(nn.Module):
    """Towers + predictors of a dense head with ``num_anchors`` (A) anchors per location.

    Subclasses set ``cls_name``/``reg_name`` (the predictors' attribute names, hence their checkpoint keys),
    ``num_anchors`` and ``has_quality``; a head with quality overrides :meth:`quality`.
    """

    cls_name = "gfl_cls"
    reg_name = "gfl_reg"
    num_anchors = 1
    has_quality = False

    def __init__(self, num_classes: int, channels: int, stacked_convs: int, reg_max: int, num_levels: int):
        super().__init__()
        self.num_classes, self.reg_max, self.channels = num_classes, reg_max, channels
        a = self.num_anchors
        self.cls_convs = nn.ModuleList(ConvGNReLU(channels, channels) for _ in range(stacked_convs))
        self.reg_convs = nn.ModuleList(ConvGNReLU(channels, channels) for _ in range(stacked_convs))
        setattr(self, self.cls_name, nn.Conv2d(channels, a * num_classes, 3, padding=1))
        setattr(self, self.reg_name, nn.Conv2d(channels, a * 4 * (reg_max + 1), 3, padding=1))
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        self.integral = Integral(reg_max)

    def init_weights(self) -> None:
        """mmdetection's head init: N(0, 0.01) convs, every class starting at p = 0.01 so the focal loss is
        not swamped by easy negatives. Subclasses call it after building their extra layers."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - 0.01) / 0.01))

    @property
    def cls_out(self) -> nn.Conv2d:
        return getattr(self, self.cls_name)

    @property
    def reg_out(self) -> nn.Conv2d:
        return getattr(self, self.reg_name)

    def quality(self, reg_feat: Tensor, reg: Tensor) -> Tensor:
        """``reg_feat (N, channels, H, W)``, ``reg (N, A*4*(R+1), H, W)`` -> quality logits ``(N, A, H, W)``."""
        raise NotImplementedError(f"{type(self).__name__} has no quality branch")

    def predict_level(self, cls_feat: Tensor, reg_feat: Tensor, level: int) -> tuple[Tensor, ...]:
        """Tower outputs of one level -> ``(cls (N, A*C, H, W), reg (N, A*4*(R+1), H, W))`` logits, the reg
        after the level's scale, plus ``quality (N, A, H, W)`` logits where the head has quality."""
        cls = self.cls_out(cls_feat)
        reg = self.scales[level](self.reg_out(reg_feat)).float()
        return (cls, reg, self.quality(reg_feat, reg)) if self.has_quality else (cls, reg)

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], ...]:
        """FPN levels -> per-level lists ``(cls_scores, bbox_preds[, quality])``, see :meth:`predict_level`."""
        outs = []
        for level, x in enumerate(feats):
            cls_feat, reg_feat = x, x
            for conv in self.cls_convs:
                cls_feat = conv(cls_feat)
            for conv in self.reg_convs:
                reg_feat = conv(reg_feat)
            outs.append(self.predict_level(cls_feat, reg_feat, level))
        return tuple(list(per_level) for per_level in zip(*outs, strict=True))

    def forward_tower(
        self, feats: list[Tensor], k: int
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """:meth:`forward`'s cls and reg outputs, plus each level's cls and reg tower features after layer
        ``k`` (1-based; 0 = the FPN level itself), taken before that layer's ReLU (CrossKD aligns them before
        the activation, as its authors do). Returns ``(cls_scores, bbox_preds, cls_feats, reg_feats)``, the
        last two ``(N, channels, H_l, W_l)`` per level."""
        cls_scores, bbox_preds, cls_feats, reg_feats = [], [], [], []
        for level, x in enumerate(feats):
            cls_feat, cls_held = _tower(self.cls_convs, x, k)
            reg_feat, reg_held = _tower(self.reg_convs, x, k)
            cls_feats.append(cls_held)
            reg_feats.append(reg_held)
            cls_scores.append(self.cls_out(cls_feat))
            bbox_preds.append(self.scales[level](self.reg_out(reg_feat)).float())
        return cls_scores, bbox_preds, cls_feats, reg_feats

    def from_tower(self, cls_feat: Tensor, reg_feat: Tensor, k: int, level: int) -> tuple[Tensor, Tensor]:
        """The rest of this head from tower features after layer ``k`` (as :meth:`forward_tower` holds them,
        before the ReLU) of FPN level ``level``: layers ``k+1..`` of both towers and the cls and reg
        predictors with the level's scale. ``(N, channels, H, W)`` each -> ``cls (N, A*C, H, W)``,
        ``reg (N, A*4*(reg_max+1), H, W)``."""
        if k > 0:
            cls_feat, reg_feat = F.relu(cls_feat), F.relu(reg_feat)
        for conv in self.cls_convs[k:]:
            cls_feat = conv(cls_feat)
        for conv in self.reg_convs[k:]:
            reg_feat = conv(reg_feat)
        return self.cls_out(cls_feat), self.scales[level](self.reg_out(reg_feat)).float()


def _tower(convs: nn.ModuleList, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``x`` through the ``convs`` -> (the tower's output, its pre-activation features after layer ``k``)."""
    held = x
    for i, conv in enumerate(convs):
        x = conv.gn(conv.conv(x))
        if i + 1 == k:
            held = x
        x = F.relu(x)
    return x, held

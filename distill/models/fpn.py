"""Feature pyramid on C3-C5 giving P3-P7, as in RetinaNet/ATSS/GFL (mmdetection's ``FPN`` with
``start_level=1, add_extra_convs='on_output', num_outs=5``)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class _Conv(nn.Module):
    """A conv wrapped so its keys read ``*.conv.weight`` like mmcv's ``ConvModule`` without a norm."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class FPN(nn.Module):
    """``extra_on_input`` (mmdetection's ``add_extra_convs='on_input'``, RetinaNet's configs) takes P6 from C5
    instead of P5's output; ``relu_before_extra`` (FCOS's configs) puts a ReLU before P7's conv. Both only for
    reading mmdetection's standard checkpoints (``distill.models.standard``); our families use neither."""

    def __init__(
        self, in_channels: list[int], channels: int = 256, extra_on_input: bool = False, relu_before_extra: bool = False
    ):
        super().__init__()
        self.extra_on_input, self.relu_before_extra = extra_on_input, relu_before_extra
        self.lateral_convs = nn.ModuleList(_Conv(c, channels, 1) for c in in_channels)
        # Three output convs on P3-P5, then two stride-2 extra convs: P6 from P5's output, P7 from P6.
        p6_in = in_channels[-1] if extra_on_input else channels
        self.fpn_convs = nn.ModuleList(
            [_Conv(channels, channels, 3) for _ in in_channels]
            + [_Conv(p6_in, channels, 3, 2), _Conv(channels, channels, 3, 2)]
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        """``[C3, C4, C5]`` -> ``[P3, ..., P7]``, each ``(N, channels, H/s, W/s)`` for s = 8 ... 128."""
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats, strict=True)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:])
        outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals, strict=False)]
        outs.append(self.fpn_convs[3](feats[-1] if self.extra_on_input else outs[-1]))
        outs.append(self.fpn_convs[4](F.relu(outs[-1]) if self.relu_before_extra else outs[-1]))
        return outs

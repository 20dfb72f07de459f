"""ResNet backbones built from torchvision's blocks, with a width knob for small CPU models.

Module names follow torchvision (``conv1, bn1, layer1..layer4``), which is also mmdetection's layout, so
torchvision ImageNet weights and mmdetection checkpoints load without renaming.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from distill.spec import RESNET_LAYERS

BLOCKS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], list[int]]] = {
    depth: (Bottleneck if bottleneck else BasicBlock, list(layers))
    for depth, (layers, bottleneck) in RESNET_LAYERS.items()
}


class ResNet(nn.Module):
    """ResNet body returning C3, C4, C5 (strides 8, 16, 32).

    ``base_width = 64`` is torchvision's ResNet exactly; smaller widths scale every stage alike.
    ``frozen_stages`` and ``norm_eval`` follow mmdetection: freeze the stem (+ layer1) and keep batch-norm
    statistics fixed; both only make sense with pretrained weights.
    """

    def __init__(self, depth: int, base_width: int = 64, frozen_stages: int = -1, norm_eval: bool = False):
        super().__init__()
        if depth not in BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(BLOCKS)}, got {depth}")
        block, layers = BLOCKS[depth]
        self.depth, self.base_width = depth, base_width
        self.frozen_stages, self.norm_eval = frozen_stages, norm_eval
        self.inplanes = base_width
        self.conv1 = nn.Conv2d(3, base_width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, base_width, layers[0], 1)
        self.layer2 = self._make_layer(block, base_width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, base_width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, base_width * 8, layers[3], 2)
        self.out_channels = [base_width * m * block.expansion for m in (2, 4, 8)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self._freeze()

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _freeze(self) -> None:
        frozen = [self.conv1, self.bn1] if self.frozen_stages >= 0 else []
        frozen += [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]
        for module in frozen:
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNet:
        super().train(mode)
        self._freeze()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def forward(self, x: Tensor) -> list[Tensor]:
        """``x (N, 3, H, W)`` -> ``[C3 (N, 2w', H/8, W/8), C4 (.., H/16, ..), C5 (.., H/32, ..)]``."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c3, c4, c5]

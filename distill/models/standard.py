"""mmdetection's standard RetinaNet, FCOS and ATSS, as they were trained: box deltas or distances, not distributions.

They serve as teachers (``distill.models.spread_teacher`` spreads their boxes over a student's bins) and as
initialisations; DESIGN section 2, "Standard forms". Module names are mmdetection's, so its checkpoints load by
key; the options no tensor shows come from the config text (``distill.mmdet_standard``). Heads, as mmdetection's
``RetinaHead``, ``FCOSHead`` and ``ATSSHead`` compute them in eval mode (``A`` anchors per location, ``C``
classes; per FPN level ``l``):

- RetinaNet: towers of conv(+bias)+ReLU; ``cls (N, A*C, H, W)``, ``deltas (N, A*4, H, W)`` (dx, dy, dw, dh);
- FCOS: GN towers; ``cls (N, C, H, W)``, distances ``(N, 4, H, W)`` in pixels (left, top, right, bottom) =
  exp(scale * x), or ReLU(scale * x) * stride with ``norm_on_bbox``; ``centerness (N, 1, H, W)`` from the cls
  tower, or the reg tower with ``centerness_on_reg``;
- ATSS: GN towers; ``cls (N, C, H, W)``, deltas ``(N, 4, H, W)`` after the level's scale, ``centerness`` from
  the reg tower.

Inputs are normalised as the checkpoint's own config says (``input``: mean, std, channel order); a caller with
our pipeline's images converts them with :meth:`StandardDetector.adapt_input`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.ckpt_reader import CheckpointError
from distill.data.images import MEAN, STD
from distill.locations import grid_locations
from distill.models.backbone import ResNet
from distill.models.fpn import FPN
from distill.models.head import Scale

PREDICTORS = {
    "retina": ("retina_cls", "retina_reg", None),
    "fcos": ("conv_cls", "conv_reg", "conv_centerness"),
    "atss": ("atss_cls", "atss_reg", "atss_centerness"),
}
WH_RATIO_CLIP = 16 / 1000  # mmdetection's DeltaXYWHBBoxCoder: |dw|, |dh| <= |log(16/1000)|


def caffe_style(resnet: ResNet) -> None:
    """Moves every Bottleneck's stride from its 3x3 conv (torchvision, mmdetection's ``pytorch`` style) to its
    first 1x1 conv (mmdetection's ``caffe`` style), in place. BasicBlocks are the same in both styles."""
    for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4):
        for block in layer:
            if hasattr(block, "conv3"):
                block.conv1.stride, block.conv2.stride = block.conv2.stride, block.conv1.stride


class TowerConv(nn.Module):
    """mmcv's ``ConvModule`` as these heads use it: a 3x3 conv (a bias without a norm, or with ``conv_bias``),
    GN, ReLU."""

    def __init__(self, channels: int, norm: bool, groups: int, bias: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=bias)
        self.gn = nn.GroupNorm(groups, channels) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return F.relu(self.gn(x) if self.gn is not None else x)


class StandardHead(nn.Module):
    def __init__(self, info: dict[str, Any]):
        super().__init__()
        opts, c, a = info["options"], info["channels"], info["num_anchors"]
        self.family, self.num_anchors, self.num_classes = info["family"], a, info["num_classes"]
        self.norm_on_bbox = bool(opts.get("norm_on_bbox", False))
        self.centerness_on_reg = self.family == "atss" or bool(opts.get("centerness_on_reg", False))
        tower = (c, opts["tower_norm"], opts["gn_groups"], opts.get("tower_bias", not opts["tower_norm"]))
        self.cls_convs = nn.ModuleList(TowerConv(*tower) for _ in range(info["stacked_convs"]))
        self.reg_convs = nn.ModuleList(TowerConv(*tower) for _ in range(info["stacked_convs"]))
        cls_name, reg_name, ctr_name = PREDICTORS[self.family]
        self.cls_name, self.reg_name, self.ctr_name = cls_name, reg_name, ctr_name
        setattr(self, cls_name, nn.Conv2d(c, a * self.num_classes, 3, padding=1))
        setattr(self, reg_name, nn.Conv2d(c, a * 4, 3, padding=1))
        if ctr_name is not None:
            setattr(self, ctr_name, nn.Conv2d(c, a, 3, padding=1))
            self.scales = nn.ModuleList(Scale(1.0) for _ in info["strides"])
        self.strides = list(info["strides"])

    @property
    def has_centerness(self) -> bool:
        return self.ctr_name is not None

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], ...]:
        """FPN levels -> per-level lists ``(cls_scores, bbox_preds[, centernesses])`` as the module docstring."""
        outs: list[tuple[Tensor, ...]] = []
        for level, x in enumerate(feats):
            cls_feat, reg_feat = x, x
            for conv in self.cls_convs:
                cls_feat = conv(cls_feat)
            for conv in self.reg_convs:
                reg_feat = conv(reg_feat)
            cls = getattr(self, self.cls_name)(cls_feat)
            reg = getattr(self, self.reg_name)(reg_feat)
            if self.ctr_name is None:
                outs.append((cls, reg))
                continue
            ctr = getattr(self, self.ctr_name)(reg_feat if self.centerness_on_reg else cls_feat)
            reg = self.scales[level](reg).float()
            if self.family == "fcos":
                reg = reg.clamp(min=0) * self.strides[level] if self.norm_on_bbox else reg.exp()
            outs.append((cls, reg, ctr))
        return tuple(list(per_level) for per_level in zip(*outs, strict=True))


class StandardDetector(nn.Module):
    """An mmdetection RetinaNet, FCOS or ATSS in its standard form; ``info`` is
    ``distill.ckpt_layout.describe_state``'s for its checkpoint (``form`` "standard")."""

    form = "standard"

    def __init__(self, info: dict[str, Any]):
        super().__init__()
        self.info = info
        opts = info["options"]
        self.backbone = ResNet(info["depth"], info["base_width"])
        if opts["style"] == "caffe":
            caffe_style(self.backbone)
        self.neck = FPN(self.backbone.out_channels, info["channels"], opts["extra_on_input"], opts["relu_before_extra"])
        self.bbox_head = StandardHead(info)
        mean, std = torch.tensor(opts["input"]["mean"]), torch.tensor(opts["input"]["std"])
        self.register_buffer("input_mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("input_std", std.view(1, 3, 1, 1), persistent=False)

    @property
    def family(self) -> str:
        return self.info["family"]

    @property
    def num_anchors(self) -> int:
        return self.info["num_anchors"]

    @property
    def num_classes(self) -> int:
        return self.info["num_classes"]

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(self.info["strides"])

    @property
    def classes(self) -> list[str]:
        return self.info.get("classes") or [str(i) for i in range(self.num_classes)]

    def adapt_input(self, images: Tensor) -> Tensor:
        """Our pipeline's images (RGB, ``(pixel - MEAN) / STD``, ``distill.data.images``) ``(N, 3, H, W)`` ->
        the same pictures normalised as this checkpoint was trained (its mean, std and channel order)."""
        pixels = images * images.new_tensor(STD).view(1, 3, 1, 1) + images.new_tensor(MEAN).view(1, 3, 1, 1)
        if not self.info["options"]["input"]["rgb"]:
            pixels = pixels.flip(1)  # the model reads BGR, as mmdetection loads images
        return (pixels - self.input_mean) / self.input_std

    def features(self, images: Tensor) -> list[Tensor]:
        """``images`` normalised as the checkpoint's config says -> ``[P3, ..., P7]``."""
        return self.neck(self.backbone(images))

    def raw_outputs(self, images: Tensor) -> tuple[list[Tensor], ...]:
        """mmdetection's head forward (eval mode): ``(cls_scores, bbox_preds)`` for RetinaNet, ``(cls_scores,
        bbox_preds, centernesses)`` for FCOS and ATSS, each a list over the levels (module docstring)."""
        return self.bbox_head(self.features(images))

    forward = raw_outputs

    def priors(self, cls_scores: list[Tensor]) -> tuple[Tensor, list[int]]:
        """mmdetection's priors for these outputs' sizes, levels concatenated, anchor-minor within a cell:
        RetinaNet/ATSS anchors ``(L*A, 4)`` x1y1x2y2 centred on ``(x * s, y * s)`` (``AnchorGenerator``,
        ``center_offset`` 0); FCOS points ``(L, 2)`` at ``((x + 0.5) * s, (y + 0.5) * s)``
        (``MlvlPointGenerator``, offset 0.5). Also the priors per level."""
        sizes = [(c.shape[-2], c.shape[-1]) for c in cls_scores]
        points, strides, counts = grid_locations(sizes, list(self.strides), cls_scores[0].device)
        if self.family == "fcos":
            return points + strides[:, None] / 2, counts
        a = self.num_anchors
        wh = anchor_sizes(self.info["options"]["anchors"]).to(points)  # (A, 2) in strides
        half = wh[None] * strides[:, None, None] / 2  # (L, A, 2)
        anchors = torch.cat([points[:, None] - half, points[:, None] + half], -1)
        return anchors.reshape(-1, 4), [n * a for n in counts]

    def decode(self, *raw: list[Tensor]) -> tuple[Tensor, Tensor, list[int]]:
        """mmdetection's box decoding: ``boxes (N, L*A, 4)`` x1y1x2y2 in input pixels, ``scores (N, L*A, C)`` =
        sigmoid(cls), times sigmoid(centerness) for FCOS and ATSS (as mmdetection ranks them for NMS), and
        the priors per level."""
        cls_scores, bbox_preds = raw[0], raw[1]
        n, c = cls_scores[0].shape[0], self.num_classes
        cls = torch.cat([x.permute(0, 2, 3, 1).reshape(n, -1, c) for x in cls_scores], 1)
        reg = torch.cat([x.permute(0, 2, 3, 1).reshape(n, -1, 4) for x in bbox_preds], 1).float()
        priors, counts = self.priors(cls_scores)
        if self.family == "fcos":
            boxes = torch.cat([priors[None] - reg[..., :2], priors[None] + reg[..., 2:]], -1)
        else:
            boxes = delta_to_box(priors[None].expand(n, -1, -1), reg, self.info["options"]["coder_stds"])
        scores = cls.sigmoid()
        if len(raw) > 2:
            ctr = torch.cat([x.permute(0, 2, 3, 1).reshape(n, -1) for x in raw[2]], 1)
            scores = scores * ctr.sigmoid()[..., None]
        return boxes, scores, counts


def anchor_sizes(anchors: dict[str, Any]) -> Tensor:
    """``(A, 2)`` anchor (w, h) in stride units from mmdetection's ``AnchorGenerator`` settings
    (``octave_base_scale``, ``scales_per_octave``, ``ratios`` = h / w), in its order: ratio-major, scale-minor."""
    n = int(anchors["scales_per_octave"])
    scales = float(anchors["octave_base_scale"]) * 2 ** (torch.arange(n, dtype=torch.float32) / n)
    h_ratios = torch.tensor([float(r) for r in anchors["ratios"]]).sqrt()
    ws = (1 / h_ratios[:, None] * scales[None]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None]).reshape(-1)
    return torch.stack([ws, hs], -1)


def delta_to_box(anchors: Tensor, deltas: Tensor, stds: list[float]) -> Tensor:
    """mmdetection's ``DeltaXYWHBBoxCoder.decode`` (means 0): ``anchors (..., 4)``, ``deltas (..., 4)`` ->
    boxes ``(..., 4)``: centre + size x (dx, dy) * std, size x exp(clamp((dw, dh) * std, +-|log(16/1000)|))."""
    d = deltas * deltas.new_tensor(stds)
    limit = abs(math.log(WH_RATIO_CLIP))
    ctr, wh = (anchors[..., :2] + anchors[..., 2:]) / 2, anchors[..., 2:] - anchors[..., :2]
    new_ctr = ctr + wh * d[..., :2]
    new_wh = wh * d[..., 2:].clamp(-limit, limit).exp()
    return torch.cat([new_ctr - new_wh / 2, new_ctr + new_wh / 2], -1)


def load_standard(state: dict[str, Tensor], info: dict[str, Any], name: str) -> StandardDetector:
    """An eval-mode :class:`StandardDetector` from mmdetection's state dict (wrappers stripped, as
    ``distill.ckpt_layout.detector_tensors`` gives it) and its ``info``; ``name`` labels errors."""
    model = StandardDetector(info)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{name}: keys do not map onto mmdetection's standard {info['family']}: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    return model.eval()

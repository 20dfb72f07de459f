"""GFL: ResNet + FPN + Generalized Focal Loss head (Li et al. 2020), as in DESIGN section 2.

Attribute names mirror mmdetection's (``backbone``, ``neck.lateral_convs.i.conv``, ``bbox_head.cls_convs.i.
conv|gn``, ``bbox_head.gfl_reg``, ``bbox_head.scales.i.scale``, ...), so an mmdetection GFL checkpoint is
this model's state dict up to the keys mmdetection adds around it (see ``distill.checkpoint``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import batched_nms

from distill.boxes import distance_to_box
from distill.locations import grid_locations
from distill.models.backbone import ResNet
from distill.models.fpn import FPN
from distill.spec import REG_MAX, STRIDES


@dataclass
class DetectorConfig:
    depth: int = 18
    base_width: int = 64
    channels: int = 256
    stacked_convs: int = 4
    num_classes: int = 80
    reg_max: int = REG_MAX
    strides: tuple[int, ...] = STRIDES
    # Inference (DESIGN section 2).
    score_thr: float = 0.05
    nms_pre: int = 1000
    nms_iou: float = 0.6
    max_per_img: int = 100
    # Backbone regime: freezing the stem and batch-norm statistics only helps with pretrained weights.
    frozen_stages: int = -1
    norm_eval: bool = False
    classes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["strides"] = list(self.strides)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DetectorConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        if "strides" in known:
            known["strides"] = tuple(known["strides"])
        return cls(**known)


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


class GFLHead(nn.Module):
    def __init__(self, num_classes: int, channels: int, stacked_convs: int, reg_max: int, num_levels: int):
        super().__init__()
        self.num_classes, self.reg_max = num_classes, reg_max
        self.cls_convs = nn.ModuleList(ConvGNReLU(channels, channels) for _ in range(stacked_convs))
        self.reg_convs = nn.ModuleList(ConvGNReLU(channels, channels) for _ in range(stacked_convs))
        self.gfl_cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.gfl_reg = nn.Conv2d(channels, 4 * (reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in range(num_levels))
        self.integral = Integral(reg_max)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # Start every class at p = 0.01 so the focal loss is not swamped by easy negatives.
        nn.init.constant_(self.gfl_cls.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        cls_scores, bbox_preds = [], []
        for x, scale in zip(feats, self.scales, strict=True):
            cls_feat, reg_feat = x, x
            for conv in self.cls_convs:
                cls_feat = conv(cls_feat)
            for conv in self.reg_convs:
                reg_feat = conv(reg_feat)
            cls_scores.append(self.gfl_cls(cls_feat))
            bbox_preds.append(scale(self.gfl_reg(reg_feat)).float())
        return cls_scores, bbox_preds

    def forward_tower(
        self, feats: list[Tensor], k: int
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """:meth:`forward`'s outputs, plus each level's cls and reg tower features after layer ``k`` (1-based;
        0 = the FPN level itself), taken before that layer's ReLU (CrossKD aligns them before the activation,
        as its authors do). Returns ``(cls_scores, bbox_preds, cls_feats, reg_feats)``, the last two
        ``(N, channels, H_l, W_l)`` per level."""
        cls_scores, bbox_preds, cls_feats, reg_feats = [], [], [], []
        for x, scale in zip(feats, self.scales, strict=True):
            cls_feat, cls_held = _tower(self.cls_convs, x, k)
            reg_feat, reg_held = _tower(self.reg_convs, x, k)
            cls_feats.append(cls_held)
            reg_feats.append(reg_held)
            cls_scores.append(self.gfl_cls(cls_feat))
            bbox_preds.append(scale(self.gfl_reg(reg_feat)).float())
        return cls_scores, bbox_preds, cls_feats, reg_feats

    def from_tower(self, cls_feat: Tensor, reg_feat: Tensor, k: int, level: int) -> tuple[Tensor, Tensor]:
        """The rest of this head from tower features after layer ``k`` (as :meth:`forward_tower` holds them,
        before the ReLU) of FPN level ``level``: layers ``k+1..`` of both towers, ``gfl_cls`` and
        ``gfl_reg`` with the level's scale. ``(N, channels, H, W)`` each -> ``cls (N, C, H, W)``,
        ``reg (N, 4 * (reg_max + 1), H, W)``."""
        if k > 0:
            cls_feat, reg_feat = F.relu(cls_feat), F.relu(reg_feat)
        for conv in self.cls_convs[k:]:
            cls_feat = conv(cls_feat)
        for conv in self.reg_convs[k:]:
            reg_feat = conv(reg_feat)
        return self.gfl_cls(cls_feat), self.scales[level](self.gfl_reg(reg_feat)).float()


def _tower(convs: nn.ModuleList, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``x`` through the ``convs`` -> (the tower's output, its pre-activation features after layer ``k``)."""
    held = x
    for i, conv in enumerate(convs):
        x = conv.gn(conv.conv(x))
        if i + 1 == k:
            held = x
        x = F.relu(x)
    return x, held


class GFL(nn.Module):
    """The detector. Images in are normalised ``(N, 3, H, W)`` with H, W multiples of 32."""

    def __init__(self, cfg: DetectorConfig, arch: str | None = None):
        super().__init__()
        self.cfg, self.arch = cfg, arch
        self.backbone = ResNet(cfg.depth, cfg.base_width, cfg.frozen_stages, cfg.norm_eval)
        self.neck = FPN(self.backbone.out_channels, cfg.channels)
        self.bbox_head = GFLHead(cfg.num_classes, cfg.channels, cfg.stacked_convs, cfg.reg_max, len(cfg.strides))

    @property
    def num_classes(self) -> int:
        return self.cfg.num_classes

    @property
    def reg_max(self) -> int:
        return self.cfg.reg_max

    @property
    def strides(self) -> tuple[int, ...]:
        return self.cfg.strides

    @property
    def classes(self) -> list[str]:
        return self.cfg.classes or [str(i) for i in range(self.cfg.num_classes)]

    def features(self, images: Tensor) -> list[Tensor]:
        """FPN levels ``[P3, ..., P7]``, each ``(N, channels, H/s, W/s)``."""
        return self.neck(self.backbone(images))

    def raw_outputs(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Per level: ``cls_scores (N, C, H_l, W_l)`` logits and ``bbox_preds (N, 4 * (reg_max + 1), H_l, W_l)``
        logits after the level's scale (mmdetection's ``GFLHead.forward``)."""
        return self.bbox_head(self.features(images))

    forward = raw_outputs

    def flatten(self, cls_scores: list[Tensor], bbox_preds: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-level maps -> ``cls (N, A, C)`` and ``reg (N, A, 4, reg_max + 1)``, levels concatenated in
        the order of :func:`distill.locations.grid_locations`."""
        n = cls_scores[0].shape[0]
        cls = torch.cat([c.permute(0, 2, 3, 1).reshape(n, -1, self.num_classes) for c in cls_scores], 1)
        reg = torch.cat([b.permute(0, 2, 3, 1).reshape(n, -1, 4, self.reg_max + 1) for b in bbox_preds], 1)
        return cls, reg

    def locations(self, cls_scores: list[Tensor]) -> tuple[Tensor, Tensor, list[int]]:
        """``points (A, 2)``, ``strides (A,)``, locations per level, for these outputs' feature sizes."""
        # Plain shape entries, not int(): under torch.export they stay symbolic (dynamic-size ONNX export).
        sizes = [(c.shape[-2], c.shape[-1]) for c in cls_scores]
        return grid_locations(sizes, list(self.strides), cls_scores[0].device)

    def decode(self, cls_scores: list[Tensor], bbox_preds: list[Tensor]) -> tuple[Tensor, Tensor, list[int]]:
        """Dense predictions in input pixels: ``boxes (N, A, 4)``, ``scores (N, A, C)`` after sigmoid, and
        the number of locations per level. Shared by :meth:`predict` and the ONNX export."""
        cls, reg = self.flatten(cls_scores, bbox_preds)
        points, strides, counts = self.locations(cls_scores)
        distances = self.bbox_head.integral(reg) * strides[None, :, None]
        return distance_to_box(points[None], distances), cls.sigmoid(), counts

    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]] | None = None) -> list[dict[str, Tensor]]:
        """Detections per image: ``boxes (K, 4)`` x1y1x2y2 in input pixels, ``scores (K,)``, ``labels (K,)``.

        ``image_sizes`` are the (h, w) of each image before padding; boxes are clipped to them.
        """
        boxes, scores, counts = self.decode(*self.raw_outputs(images))
        n, _, num_classes = scores.shape
        if image_sizes is None:
            image_sizes = [tuple(images.shape[-2:])] * n
        results = []
        for i in range(n):
            h, w = image_sizes[i]
            cand_boxes, cand_scores, cand_labels = [], [], []
            # Per level: keep the nms_pre best (location, class) pairs above the score threshold.
            for lvl_boxes, lvl_scores in zip(boxes[i].split(counts), scores[i].split(counts), strict=True):
                flat = lvl_scores.reshape(-1)
                keep = (flat > self.cfg.score_thr).nonzero().squeeze(1)
                top = flat[keep].topk(min(self.cfg.nms_pre, keep.numel())).indices
                keep = keep[top]
                cand_boxes.append(lvl_boxes[keep // num_classes])
                cand_scores.append(flat[keep])
                cand_labels.append(keep % num_classes)
            b, s, lab = torch.cat(cand_boxes), torch.cat(cand_scores), torch.cat(cand_labels)
            b = torch.stack([b[:, 0].clamp(0, w), b[:, 1].clamp(0, h), b[:, 2].clamp(0, w), b[:, 3].clamp(0, h)], 1)
            keep = batched_nms(b, s, lab, self.cfg.nms_iou)[: self.cfg.max_per_img]
            results.append({"boxes": b[keep], "scores": s[keep], "labels": lab[keep]})
        return results

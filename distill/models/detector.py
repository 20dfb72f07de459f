"""The detector of every family (DESIGN section 2): ResNet + FPN + the family's dense head.

Attribute names mirror mmdetection's (``backbone``, ``neck.lateral_convs.i.conv``, ``bbox_head.cls_convs.i.
conv|gn``, ``bbox_head.<predictor>``, ``bbox_head.scales.i.scale``, ...), so an mmdetection GFL checkpoint
is this model's state dict up to the keys mmdetection adds around it (see ``distill.checkpoint``).

Shapes: ``A`` anchors per location (RetinaNet 9, the others 1), ``C`` classes, ``R = reg_max``; flattened
outputs run over ``L*A`` anchors, levels concatenated, each level row-major over its cells and anchor-minor
within a cell (index = location * A + a).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms

from distill.boxes import distance_to_box
from distill.locations import grid_locations, retina_anchors, square_anchors
from distill.models.backbone import ResNet
from distill.models.config import DetectorConfig
from distill.models.fcos_head import ATSSHead, FCOSHead
from distill.models.fpn import FPN
from distill.models.gfl_head import GFLHead
from distill.models.gflv2_head import GFLV2Head
from distill.models.head import DenseHead
from distill.models.retina_head import RetinaHead


def make_head(cfg: DetectorConfig) -> DenseHead:
    """The dense head of ``cfg.family``."""
    head: type[DenseHead] = {
        "gfl": GFLHead,
        "gflv2": GFLV2Head,
        "atss": ATSSHead,
        "fcos": FCOSHead,
        "retina": RetinaHead,
    }[cfg.family]
    return head(cfg.num_classes, cfg.channels, cfg.stacked_convs, cfg.reg_max, len(cfg.strides))


class Detector(nn.Module):
    """The detector. Images in are normalised ``(N, 3, H, W)`` with H, W multiples of 32."""

    def __init__(self, cfg: DetectorConfig, arch: str | None = None):
        super().__init__()
        self.cfg, self.arch = cfg, arch
        self.backbone = ResNet(cfg.depth, cfg.base_width, cfg.frozen_stages, cfg.norm_eval)
        self.neck = FPN(self.backbone.out_channels, cfg.channels)
        self.bbox_head = make_head(cfg)

    @property
    def family(self) -> str:
        return self.cfg.family

    @property
    def num_anchors(self) -> int:
        return self.bbox_head.num_anchors

    @property
    def has_quality(self) -> bool:
        return self.bbox_head.has_quality

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

    def raw_outputs(self, images: Tensor) -> tuple[list[Tensor], ...]:
        """Per level: ``cls_scores (N, A*C, H_l, W_l)`` logits, ``bbox_preds (N, A*4*(R+1), H_l, W_l)`` logits
        after the level's scale (mmdetection's ``GFLHead.forward``) and, for the families with quality
        (fcos, atss: centerness; gflv2: DGQP), ``quality (N, A, H_l, W_l)`` logits."""
        return self.bbox_head(self.features(images))

    forward = raw_outputs

    def flatten(self, cls_scores: list[Tensor], bbox_preds: list[Tensor]) -> tuple[Tensor, Tensor]:
        """Per-level maps -> ``cls (N, L*A, C)`` and ``reg (N, L*A, 4, R+1)``, in :meth:`locations`' order."""
        n = cls_scores[0].shape[0]
        cls = torch.cat([c.permute(0, 2, 3, 1).reshape(n, -1, self.num_classes) for c in cls_scores], 1)
        reg = torch.cat([b.permute(0, 2, 3, 1).reshape(n, -1, 4, self.reg_max + 1) for b in bbox_preds], 1)
        return cls, reg

    def flatten_quality(self, quality: list[Tensor]) -> Tensor:
        """Per-level quality maps ``(N, A, H_l, W_l)`` -> logits ``(N, L*A)`` in :meth:`locations`' order."""
        n = quality[0].shape[0]
        return torch.cat([q.permute(0, 2, 3, 1).reshape(n, -1) for q in quality], 1)

    def locations(self, cls_scores: list[Tensor]) -> tuple[Tensor, Tensor, list[int]]:
        """``points (L*A, 2)`` anchor centres (each cell's point repeated A times), ``strides (L*A,)`` and the
        anchors per level (``H_l * W_l * A``), for these outputs' feature sizes."""
        # Plain shape entries, not int(): under torch.export they stay symbolic (dynamic-size ONNX export).
        sizes = [(c.shape[-2], c.shape[-1]) for c in cls_scores]
        points, strides, counts = grid_locations(sizes, list(self.strides), cls_scores[0].device)
        a = self.num_anchors
        if a == 1:
            return points, strides, counts
        return points.repeat_interleave(a, 0), strides.repeat_interleave(a, 0), [c * a for c in counts]

    def anchors(self, points: Tensor, strides: Tensor) -> Tensor:
        """The preset anchors ``(L*A, 4)`` x1y1x2y2 of :meth:`locations`' ``points``/``strides``:
        RetinaNet's nine per location, every other family's one square of side 8 x stride."""
        if self.family == "retina":
            return retina_anchors(points, strides)
        return square_anchors(points, strides)

    def decode(
        self, cls_scores: list[Tensor], bbox_preds: list[Tensor], quality: list[Tensor] | None = None
    ) -> tuple[Tensor, Tensor, list[int]]:
        """Dense predictions in input pixels: ``boxes (N, L*A, 4)``, ``scores (N, L*A, C)`` = sigmoid(cls),
        times sigmoid(quality) for the families with quality, and the anchors per level. Shared by
        :meth:`predict` and the ONNX export."""
        cls, reg = self.flatten(cls_scores, bbox_preds)
        points, strides, counts = self.locations(cls_scores)
        distances = self.bbox_head.integral(reg) * strides[None, :, None]
        scores = cls.sigmoid()
        if quality is not None:
            scores = scores * self.flatten_quality(quality).sigmoid()[..., None]
        return distance_to_box(points[None], distances), scores, counts

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
            # Per level: keep the nms_pre best (anchor, class) pairs above the score threshold.
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

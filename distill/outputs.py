"""What the criteria read: a batch's padded ground truths (:class:`GroundTruth`) and a detector's dense
outputs (:class:`HeadOutputs`), for every family (DESIGN section 2).

A family with a quality branch (FCOS and ATSS: centerness; GFocalV2: DGQP) ranks its detections by
``sigmoid(cls) * sigmoid(quality)``; :func:`score_logits` is that score as a logit, which is what the
classification distillation terms compare across families (a GFL student learns the score a GFocalV2 teacher
ranks by, not its bare class logit). :func:`student_layout` puts a teacher's outputs into the student's
rows (:mod:`distill.anchor_match`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.anchor_match import match_anchors
from distill.models.gfl import GFL


@dataclass
class GroundTruth:
    """A batch's ground truths padded to the largest count ``G``."""

    boxes: Tensor  # (B, G, 4) x1y1x2y2 in input pixels, zeros for padding
    labels: Tensor  # (B, G) long: contiguous class index, 0 for padding
    valid: Tensor  # (B, G) bool: False for padding
    image_sizes: Tensor | None = None  # (B, 2) float (h, w) of each image before padding, when the loader gives it


def pad_targets(targets: list[dict], device: torch.device | str) -> GroundTruth:
    """The loader's per-image targets (``boxes (G_i, 4)``, ``labels (G_i,)``, optional unpadded ``size (h,
    w)``) -> a padded :class:`GroundTruth`."""
    g = max((len(t["labels"]) for t in targets), default=0)
    b = len(targets)
    boxes = torch.zeros((b, g, 4), device=device)
    labels = torch.zeros((b, g), dtype=torch.long, device=device)
    valid = torch.zeros((b, g), dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        k = len(t["labels"])
        boxes[i, :k] = t["boxes"].to(device)
        labels[i, :k] = t["labels"].to(device)
        valid[i, :k] = True
    sizes = None
    if targets and all("size" in t for t in targets):
        sizes = torch.tensor([list(t["size"]) for t in targets], dtype=torch.float32, device=device)
    return GroundTruth(boxes, labels, valid, sizes)


def valid_locations(points: Tensor, gt: GroundTruth, batch: int) -> Tensor:
    """``(B, A)`` bool: the locations ``points (A, 2)`` inside each image's unpadded area (all of them when the
    loader gave no sizes)."""
    if gt.image_sizes is None:
        return torch.ones((batch, points.shape[0]), dtype=torch.bool, device=points.device)
    h, w = gt.image_sizes[:, 0:1], gt.image_sizes[:, 1:2]  # (B, 1) each
    return (points[None, :, 0] < w) & (points[None, :, 1] < h)


@dataclass
class HeadOutputs:
    """A detector's dense outputs for a batch, levels concatenated (``L*A`` anchors), in float32."""

    cls: Tensor  # (B, L*A, C) class logits
    reg: Tensor  # (B, L*A, 4, R + 1) edge logits
    sizes: tuple[tuple[int, int], ...]  # (H_l, W_l) of each level's map
    feats: list[Tensor] | None = None  # FPN levels (B, channels, H_l, W_l), only when a term needs them
    # CrossKD: the (cls, reg) tower features after layer k, per level (B, channels, H_l, W_l), before the ReLU
    tower: tuple[list[Tensor], list[Tensor]] | None = None
    quality: Tensor | None = None  # (B, L*A) quality logits (centerness, DGQP); None for gfl and retina


def head_outputs(
    model: GFL, images: Tensor, amp: bool, keep_feats: bool = False, tower_layer: int | None = None
) -> HeadOutputs:
    """``model``'s outputs for normalised ``images (B, 3, H, W)``; ``amp``: bfloat16 autocast (GPU);
    ``tower_layer``: also keep the head's tower features after that layer (CrossKD)."""
    tower = None
    head = model.bbox_head
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        feats = model.features(images)
        if tower_layer is None:
            maps = head(feats)
        else:
            cls_maps, reg_maps, cls_feats, reg_feats = head.forward_tower(feats, tower_layer)
            tower = (cls_feats, reg_feats)
            maps = (cls_maps, reg_maps)
            if model.has_quality:
                maps += (_tower_quality(head, reg_feats, reg_maps, tower_layer),)
        cls, reg = model.flatten(maps[0], maps[1])
        quality = model.flatten_quality(maps[2]).float() if len(maps) > 2 else None
    sizes = tuple((int(c.shape[-2]), int(c.shape[-1])) for c in maps[0])
    return HeadOutputs(cls.float(), reg.float(), sizes, feats if keep_feats else None, tower, quality)


def _tower_quality(head: torch.nn.Module, reg_feats: list[Tensor], reg_maps: list[Tensor], k: int) -> list[Tensor]:
    """The quality maps ``(N, A, H_l, W_l)`` of a pass that kept the tower features after layer ``k``
    (``forward_tower`` returns no quality): the reg tower's layers after ``k`` are run again from the held
    features (pre-activation, hence the ReLU) to reach the features the quality branch reads."""
    out = []
    for feat, reg in zip(reg_feats, reg_maps, strict=True):
        x = F.relu(feat) if k > 0 else feat
        for conv in head.reg_convs[k:]:
            x = conv(x)
        out.append(head.quality(x, reg))
    return out


def score_logits(out: HeadOutputs) -> Tensor:
    """``(B, L*A, C)``: the logit of the score the detector ranks by: ``cls`` itself, or for a family with
    quality ``logit(sigmoid(cls) * sigmoid(quality))``, computed in log space (stable for large logits)."""
    if out.quality is None:
        return out.cls
    log_p = (F.logsigmoid(out.cls) + F.logsigmoid(out.quality)[..., None]).clamp(max=-1e-7)
    return log_p - torch.log(-torch.expm1(log_p))


def student_layout(out: HeadOutputs, a_from: int, a_to: int) -> HeadOutputs:
    """A teacher's outputs as the distillation terms read them: in the student's rows (``a_from`` teacher
    anchors per location -> ``a_to`` student anchors, :func:`distill.anchor_match.match_anchors`, the
    teacher's anchor chosen by its score) and with the quality folded into ``cls`` (:func:`score_logits`;
    ``quality`` None). Outputs already in that form pass through."""
    cls = score_logits(out)
    if a_from == a_to and out.quality is None:
        return out
    score = cls.detach().sigmoid().amax(-1)  # (B, L*a_from)
    cls, reg = match_anchors(score, [cls, out.reg], a_from, a_to)
    return replace(out, cls=cls, reg=reg, quality=None)

"""A standard-form teacher (mmdetection's RetinaNet, FCOS, ATSS: no edge distributions) as LD reads a teacher.

DESIGN section 2, "Standard forms": each decoded edge, taken in stride units from the location's point and
clipped to ``[0, reg_max]``, is split over its two neighbouring bins as DFL's target is (``e`` between bins
``i`` and ``i+1``: weight ``i + 1 - e`` on ``i``, ``e - i`` on ``i+1``). The spread has the edge as its
expectation, so the integral decodes the teacher's own box wherever its edges are in range.

:class:`SpreadTeacher` presents the families' ``Detector`` interface over such a model: its box "logits" are
``log(max(p, 1e-12))`` of the two-bin probabilities, so ``softmax`` at temperature 1 gives the spread back
(each empty bin keeps 1e-12: finite logs, never 0 x log 0). ``hard_edge_targets = True`` tells the criterion
to use LD's temperature 1 on them: KL(spread || student) then differs from DFL towards the teacher's box only by
the spread's entropy, a constant, so its gradient is DFL's. Classes stay the teacher's (KD maps them by name);
FCOS and ATSS give their centerness as the quality, as our FCOS/ATSS families do; a RetinaNet presents its
nine anchors per location, in mmdetection's order, as our ``retina`` family does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from distill.models.config import DetectorConfig
from distill.models.detector import Detector
from distill.models.head import Integral
from distill.models.standard import StandardDetector

EMPTY_BIN = 1e-12  # probability floor of the bins the spread leaves empty, so their logits stay finite


def two_bin_spread(edges: Tensor, reg_max: int) -> Tensor:
    """``edges (...)`` in stride units -> probabilities ``(..., reg_max + 1)``: clipped to ``[0, reg_max]``, then
    split over the two bins around it (an edge on a bin puts all its weight there). Sums to 1; expectation =
    the clipped edge."""
    e = edges.float().clamp(0, reg_max)
    left = e.floor().clamp(max=reg_max - 1)  # e = reg_max: weight 0 on reg_max - 1, 1 on reg_max
    right_w = e - left
    probs = e.new_zeros(*e.shape, reg_max + 1)
    probs.scatter_(-1, left.long()[..., None], (1 - right_w)[..., None])
    probs.scatter_add_(-1, left.long()[..., None] + 1, right_w[..., None])
    return probs


class _SpreadHead(nn.Module):
    """What the training side reads off a detector's ``bbox_head``: anchors per location, quality, integral."""

    def __init__(self, num_anchors: int, has_quality: bool, reg_max: int):
        super().__init__()
        self.num_anchors, self.has_quality, self.reg_max = num_anchors, has_quality, reg_max
        self.integral = Integral(reg_max)


class SpreadTeacher(Detector):
    """``standard``'s predictions as a ``Detector`` of its family with ``reg_max`` bins (the student's).

    Takes our pipeline's images (``adapt_input`` converts them to the checkpoint's own normalisation). Only the
    outputs exist: no towers for CrossKD, and ``features`` are the standard model's own FPN levels.
    """

    hard_edge_targets = True

    def __init__(self, standard: StandardDetector, reg_max: int):
        nn.Module.__init__(self)  # no ResNet/FPN/head of our own: the standard model computes everything
        info = standard.info
        self.standard = standard.eval()
        self.cfg = DetectorConfig(
            family=standard.family, depth=info["depth"], base_width=info["base_width"], channels=info["channels"],
            stacked_convs=info["stacked_convs"], num_classes=standard.num_classes, reg_max=reg_max,
            strides=standard.strides, classes=list(standard.classes),
        )  # fmt: skip
        self.arch = info.get("name")
        self.bbox_head = _SpreadHead(standard.num_anchors, standard.bbox_head.has_centerness, reg_max)

    def train(self, mode: bool = True) -> SpreadTeacher:
        """A teacher stays in eval mode (batch-norm statistics, no dropout) whatever its caller asks."""
        super().train(False)
        return self

    def features(self, images: Tensor) -> list[Tensor]:
        return self.standard.features(self.standard.adapt_input(images))

    def raw_outputs(self, images: Tensor) -> tuple[list[Tensor], ...]:
        """Our pipeline's ``images (N, 3, H, W)`` -> per level ``cls (N, A*C, H, W)`` logits, ``reg
        (N, A*4*(R+1), H, W)`` log two-bin probabilities of the teacher's decoded edges measured from
        :meth:`locations`' points, and, for FCOS/ATSS, centerness logits ``(N, A, H, W)``."""
        raw = self.standard.raw_outputs(self.standard.adapt_input(images))
        cls_scores = raw[0]
        boxes, _, counts = self.standard.decode(*raw)  # (N, L*A, 4) in input pixels
        points, strides, _ = self.locations(cls_scores)
        edges = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], -1) / strides[None, :, None]
        logits = two_bin_spread(edges, self.reg_max).clamp_min(EMPTY_BIN).log()  # (N, L*A, 4, R+1)
        n, a = boxes.shape[0], self.num_anchors
        reg = [
            lvl.reshape(n, c.shape[-2], c.shape[-1], a * 4 * (self.reg_max + 1)).permute(0, 3, 1, 2)
            for lvl, c in zip(logits.split(counts, 1), cls_scores, strict=True)
        ]
        return (cls_scores, reg, *raw[2:])

    forward = raw_outputs


def spread_teacher(model: nn.Module, reg_max: int) -> nn.Module:
    """The teacher LD reads: a standard-form model wrapped as :class:`SpreadTeacher` with the student's
    ``reg_max``; any other model as it is."""
    return SpreadTeacher(model, reg_max) if isinstance(model, StandardDetector) else model

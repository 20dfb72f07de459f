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

from distill.locations import grid_locations
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


class SpreadHead(nn.Module):
    """The standard model's head followed by the spread: what the training side reads off a detector's
    ``bbox_head`` (``forward(feats)``, ``num_anchors``, ``has_quality``, ``integral``)."""

    def __init__(self, standard: StandardDetector, reg_max: int):
        super().__init__()
        self.standard = standard
        self.num_anchors, self.has_quality = standard.num_anchors, standard.bbox_head.has_centerness
        self.reg_max = reg_max
        self.integral = Integral(reg_max)

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], ...]:
        """The standard model's FPN levels -> per level ``cls (N, A*C, H, W)`` logits, ``reg (N, A*4*(R+1), H,
        W)`` log two-bin probabilities of the teacher's decoded edges, measured from the families' points
        (``Detector.locations``: ``(x * s, y * s)``, each repeated A times), and, for FCOS/ATSS, centerness
        logits ``(N, A, H, W)``."""
        raw = self.standard.bbox_head(feats)
        cls_scores = raw[0]
        boxes, _, counts = self.standard.decode(*raw)  # (N, L*A, 4) in input pixels
        sizes = [(c.shape[-2], c.shape[-1]) for c in cls_scores]
        points, strides, _ = grid_locations(sizes, list(self.standard.strides), boxes.device)
        a = self.num_anchors
        points, strides = points.repeat_interleave(a, 0), strides.repeat_interleave(a, 0)
        edges = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], -1) / strides[None, :, None]
        logits = two_bin_spread(edges, self.reg_max).clamp_min(EMPTY_BIN).log()  # (N, L*A, 4, R+1)
        n = boxes.shape[0]
        reg = [
            lvl.reshape(n, h, w, a * 4 * (self.reg_max + 1)).permute(0, 3, 1, 2)
            for lvl, (h, w) in zip(logits.split(counts, 1), sizes, strict=True)
        ]
        return (cls_scores, reg, *raw[2:])


class SpreadTeacher(Detector):
    """``standard``'s predictions as a ``Detector`` of its family with ``reg_max`` bins (the student's).

    Takes our pipeline's images (``features`` converts them to the checkpoint's own normalisation first). Only
    the outputs exist: no towers for CrossKD (``distill.pairing`` refuses it), and ``features`` are the
    standard model's own FPN levels.
    """

    hard_edge_targets = True

    def __init__(self, standard: StandardDetector, reg_max: int):
        nn.Module.__init__(self)  # no ResNet/FPN/head of our own: the standard model computes everything
        info = standard.info
        self.cfg = DetectorConfig(
            family=standard.family, depth=info["depth"], base_width=info["base_width"], channels=info["channels"],
            stacked_convs=info["stacked_convs"], num_classes=standard.num_classes, reg_max=reg_max,
            strides=standard.strides, classes=list(standard.classes),
        )  # fmt: skip
        self.arch = info.get("name")
        self.bbox_head = SpreadHead(standard.eval(), reg_max)

    @property
    def standard(self) -> StandardDetector:
        return self.bbox_head.standard

    def train(self, mode: bool = True) -> SpreadTeacher:
        """A teacher stays in eval mode (batch-norm statistics) whatever its caller asks."""
        super().train(False)
        return self

    def features(self, images: Tensor) -> list[Tensor]:
        """Our pipeline's ``images (N, 3, H, W)`` -> the standard model's FPN levels ``[P3, ..., P7]``;
        ``raw_outputs`` (``bbox_head(features(images))``) gives the spread maps (:class:`SpreadHead`)."""
        return self.standard.features(self.standard.adapt_input(images))

    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]] | None = None) -> list[dict[str, Tensor]]:
        """The teacher's own detections (its boxes as mmdetection decodes them, not clipped to the student's
        bins), selected as every family's are (``Detector.predict``): the AP a job reports for its teacher."""
        return Detector.predict(_ExactView(self), images, image_sizes)  # type: ignore[arg-type]


class _ExactView:
    """What ``Detector.predict`` reads of a detector, answered by the standard model's own outputs and decoding."""

    def __init__(self, teacher: SpreadTeacher):
        self.cfg, self.standard = teacher.cfg, teacher.standard

    def raw_outputs(self, images: Tensor) -> tuple[list[Tensor], ...]:
        return self.standard.raw_outputs(self.standard.adapt_input(images))

    def decode(self, *raw: list[Tensor]) -> tuple[Tensor, Tensor, list[int]]:
        return self.standard.decode(*raw)


def spread_teacher(model: nn.Module, reg_max: int) -> nn.Module:
    """The teacher LD reads: a standard-form model wrapped as :class:`SpreadTeacher` with the student's
    ``reg_max``; any other model as it is."""
    if not isinstance(model, StandardDetector):
        return model
    return SpreadTeacher(model, reg_max).to(next(model.parameters()).device)

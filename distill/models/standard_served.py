"""A standard-form model (mmdetection's RetinaNet, FCOS, ATSS) served as it is: what export and prediction read.

Issue 19, "Served as they are". :class:`ServedStandard` is the same model behind the interface that
``Detector.predict`` and ``deploy.graph.DetectorWithPostprocess`` read of a detector: it takes our pipeline's
images (``distill.data.images``: RGB, ``(pixel - MEAN) / STD``) and converts them to the checkpoint's own
normalisation inside the graph (``adapt_input``), decodes with the model's own formulas (deltas, distances,
centerness: ``StandardDetector.decode``), and selects with the families' post-processing (``cfg``: score
threshold, per-level ``nms_pre``, class-aware NMS, ``max_per_img``). No edge distributions: ``reg_max`` is None.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from distill.models.config import DetectorConfig
from distill.models.detector import Detector
from distill.models.standard import StandardDetector


class ServedStandard(StandardDetector):
    """``standard``'s modules (shared, not copied; same names, so the graph's ``/backbone``, ``/neck`` and
    ``/bbox_head`` scopes are the network) read with our pipeline's images."""

    reg_max = None  # no distributions: box deltas or distances

    def __init__(self, standard: StandardDetector):
        nn.Module.__init__(self)
        self.info = standard.info
        self.backbone, self.neck, self.bbox_head = standard.backbone, standard.neck, standard.bbox_head
        self.register_buffer("input_mean", standard.input_mean, persistent=False)
        self.register_buffer("input_std", standard.input_std, persistent=False)
        info = standard.info
        self.cfg = DetectorConfig(
            family=standard.family, depth=info["depth"], base_width=info["base_width"], channels=info["channels"],
            stacked_convs=info["stacked_convs"], num_classes=standard.num_classes, strides=standard.strides,
            classes=list(standard.classes),
        )  # fmt: skip
        self.arch: str | None = info.get("name")

    def raw_outputs(self, images: Tensor) -> tuple[list[Tensor], ...]:
        """Our pipeline's ``images (N, 3, H, W)`` -> the standard head's outputs (``StandardDetector.raw_outputs``
        on the same pictures in the checkpoint's normalisation)."""
        return StandardDetector.raw_outputs(self, self.adapt_input(images))

    forward = raw_outputs

    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: list[tuple[int, int]] | None = None) -> list[dict[str, Tensor]]:
        """Detections per image, selected as every family's are (``Detector.predict``) from this model's own
        decoding: ``boxes (K, 4)`` x1y1x2y2 in input pixels, ``scores (K,)``, ``labels (K,)``."""
        return Detector.predict(self, images, image_sizes)  # type: ignore[arg-type]


def served(model: Any) -> Any:
    """What export and prediction read: a :class:`StandardDetector` as :class:`ServedStandard`, any other
    model (a family's ``Detector``) as it is."""
    if isinstance(model, StandardDetector) and not isinstance(model, ServedStandard):
        return ServedStandard(model)
    return model

"""The names GFL code has always imported (``GFL``, ``DetectorConfig``, ``GFLHead``, ``Integral``, ...):
since the other families arrived the detector is ``distill.models.detector.Detector`` (``GFL`` is that same
class), its config ``distill.models.config``, the shared head parts ``distill.models.head`` and GFL's own
head ``distill.models.gfl_head``."""

from __future__ import annotations

from distill.models.config import DetectorConfig
from distill.models.detector import Detector
from distill.models.gfl_head import GFLHead
from distill.models.head import ConvGNReLU, Integral, Scale

GFL = Detector

__all__ = ["GFL", "Detector", "DetectorConfig", "GFLHead", "ConvGNReLU", "Integral", "Scale"]

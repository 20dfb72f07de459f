"""Localization Distillation for dense detectors, in plain PyTorch/torchvision.

The package imports without torch (``distill.spec`` and the annotation readers are torch-free, so the
API can validate jobs and datasets); the torch entry points load on first use.
"""

from typing import Any

__all__ = ["load_detector", "build_detector"]


def __getattr__(name: str) -> Any:
    if name in ("load_detector", "build_detector"):
        from distill import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(name)

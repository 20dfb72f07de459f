"""Building detectors, saving them, and loading project or mmdetection GFL checkpoints.

A project checkpoint is a plain dict read with ``weights_only=True``::

    {"format": "ld-service/1", "arch": "gfl_r18", "config": DetectorConfig.to_dict(),
     "state_dict": {...}, "meta": {"input_size": [long, short], "mean": [...], "std": [...], ...}}

(the resume checkpoint ``last.pt`` has the same keys plus the training state). An mmdetection checkpoint is
``{"meta": ..., "state_dict": ...}``; our module names mirror mmdetection's, so mapping it means dropping
wrapper prefixes and keys outside the detector, then reading the architecture off the tensor shapes.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distill.files import atomic_write
from distill.models.backbone import BLOCKS
from distill.models.gfl import GFL, DetectorConfig
from distill.spec import ARCHITECTURES, arch_config

FORMAT = "ld-service/1"
_PARTS = ("backbone.", "neck.", "bbox_head.")


class CheckpointError(ValueError):
    pass


def build_detector(
    arch: str, num_classes: int, classes: list[str] | None = None, pretrained: str | None = None
) -> GFL:
    """A freshly initialised detector of a named architecture (``gfl_tiny``, ``gfl_r18``, ... ``gfl_r101``).

    ``pretrained`` is a local torchvision ResNet state dict; with it the stem and layer1 are frozen and
    batch-norm statistics kept fixed, as mmdetection does with ImageNet weights.
    """
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    extra = {"frozen_stages": 1, "norm_eval": True} if pretrained else {}
    cfg = DetectorConfig(**arch_config(arch), num_classes=num_classes, classes=list(classes or []), **extra)
    model = GFL(cfg, arch)
    if pretrained:
        model.backbone.load_pretrained(pretrained)
    return model


def detector_state(model: GFL, meta: dict | None = None) -> dict[str, Any]:
    """The checkpoint dict of a detector (without training state)."""
    return {
        "format": FORMAT,
        "arch": model.arch or "custom",
        "config": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """Write to a temporary file and rename, so a crash never leaves a half-written checkpoint."""
    atomic_write(path, lambda f: torch.save(obj, f))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a checkpoint without running pickled code.

    ``weights_only=True`` first; mmengine checkpoints may also carry objects (message hub, optimizer
    wrappers) that it refuses, so those are read with an unpickler that turns every unknown class into an
    inert placeholder: nothing from the file is ever imported or called.
    """
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            obj = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_InertPickle)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch raises many kinds for a damaged file; all mean the same to the user
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict checkpoint, found {type(obj).__name__}")
    return obj


def load_detector(path: str | os.PathLike, device: str | torch.device = "cpu") -> GFL:
    """An eval-mode detector from a project checkpoint or an mmdetection GFL checkpoint."""
    ckpt = read_checkpoint(path)
    if ckpt.get("format") == FORMAT:
        cfg = DetectorConfig.from_dict(ckpt["config"])
        model = GFL(cfg, ckpt.get("arch"))
        model.load_state_dict(ckpt["state_dict"])
    else:
        state = mmdet_state_dict(ckpt)
        cfg = infer_config(state)
        cfg.classes = _mmdet_classes(ckpt.get("meta"), cfg.num_classes)
        model = GFL(cfg, _arch_name(cfg))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("integral.project")]
        if missing or unexpected:
            raise CheckpointError(f"{path}: keys do not map onto GFL: missing {missing[:8]}, "
                                  f"unexpected {unexpected[:8]}")
    return model.to(device).eval()


def checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Architecture facts of a checkpoint (arch, config, meta) without building the model."""
    ckpt = read_checkpoint(path)
    if ckpt.get("format") == FORMAT:
        return {"arch": ckpt.get("arch"), "config": ckpt["config"], "meta": ckpt.get("meta", {})}
    cfg = infer_config(mmdet_state_dict(ckpt))
    cfg.classes = _mmdet_classes(ckpt.get("meta"), cfg.num_classes)
    return {"arch": _arch_name(cfg), "config": cfg.to_dict(), "meta": {"source": "mmdetection"}}


def mmdet_state_dict(ckpt: dict[str, Any]) -> dict[str, Tensor]:
    """The detector's tensors of an mmdetection checkpoint, keyed like :class:`GFL`'s state dict."""
    state = ckpt.get("state_dict", ckpt)
    if not isinstance(state, dict):
        raise CheckpointError("checkpoint has no state_dict")
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.").removeprefix("model.")  # DDP / EMA wrappers
        if key.startswith(_PARTS) and isinstance(value, Tensor):
            out[key] = value
    if "bbox_head.gfl_reg.weight" not in out:
        raise CheckpointError("not a GFL checkpoint: no bbox_head.gfl_reg weights found")
    return out


def infer_config(state: dict[str, Tensor]) -> DetectorConfig:
    """Reads depth, width, channels, stacked convs, classes and reg_max off a GFL state dict's shapes."""
    def count(pattern: str) -> int:
        idx = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
        return max(idx) + 1 if idx else 0

    blocks = [count(rf"backbone\.layer{i}\.(\d+)\.") for i in range(1, 5)]
    bottleneck = "backbone.layer1.0.conv3.weight" in state
    depth = next((d for d, (block, layers) in BLOCKS.items()
                  if layers == blocks and (block.expansion == 4) == bottleneck), None)
    if depth is None:
        raise CheckpointError(f"unsupported backbone: blocks per stage {blocks}, bottleneck={bottleneck}")
    reg_channels = state["bbox_head.gfl_reg.weight"].shape[0]
    num_levels = count(r"bbox_head\.scales\.(\d+)\.")
    return DetectorConfig(
        depth=depth,
        base_width=state["backbone.conv1.weight"].shape[0],
        channels=state["neck.lateral_convs.0.conv.weight"].shape[0],
        stacked_convs=count(r"bbox_head\.cls_convs\.(\d+)\."),
        num_classes=state["bbox_head.gfl_cls.weight"].shape[0],
        reg_max=reg_channels // 4 - 1,
        strides=tuple(8 * 2**i for i in range(num_levels)),
    )


def _arch_name(cfg: DetectorConfig) -> str:
    for name, (depth, width, channels, stacked) in ARCHITECTURES.items():
        if (cfg.depth, cfg.base_width, cfg.channels, cfg.stacked_convs) == (depth, width, channels, stacked):
            return name
    return f"gfl_r{cfg.depth}_w{cfg.base_width}_c{cfg.channels}_s{cfg.stacked_convs}"


def _mmdet_classes(meta: Any, num_classes: int) -> list[str]:
    if isinstance(meta, dict):
        names = (meta.get("dataset_meta") or {}).get("classes") if isinstance(meta.get("dataset_meta"), dict) \
            else meta.get("CLASSES")
        if isinstance(names, list | tuple) and len(names) == num_classes and all(isinstance(n, str) for n in names):
            return list(names)
    return []


class _Inert:
    """Stands in for any class or function a checkpoint names that is not on the allow-list."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()


class _InertUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch", "Size"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED or (module == "torch" and name.endswith("Storage")):
            return super().find_class(module, name)
        return _Inert


class _InertPickle:
    """A ``pickle_module`` for ``torch.load`` whose unpickler never imports what the file names."""

    Unpickler = _InertUnpickler
    UnpicklingError = pickle.UnpicklingError
    load = staticmethod(lambda f, **kw: _InertUnpickler(f, **kw).load())

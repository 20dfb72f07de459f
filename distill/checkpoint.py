"""Building detectors of every family, saving them, and loading project or mmdetection GFL checkpoints.

A project checkpoint is a plain dict read with ``weights_only=True``::

    {"format": "ld-service/1", "arch": "gfl_r18", "config": DetectorConfig.to_dict() (with its family),
     "state_dict": {...}, "meta": {"input_size": [long, short], "mean": [...], "std": [...], ...}}

(the resume checkpoint ``last.pt`` has the same keys plus the training state). An mmdetection checkpoint is
``{"meta": ..., "state_dict": ...}``; our module names mirror mmdetection's, so mapping it means dropping
wrapper prefixes and keys outside the detector, then reading the architecture off the tensor shapes. Both
steps are the torch-free reader's (``distill.ckpt_reader``), so the API, training and export agree on
what a file holds.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import torch
from torch import Tensor

from distill.ckpt_layout import backbone_tensors, detector_tensors, infer_architecture
from distill.ckpt_reader import CheckpointError, InertUnpickler
from distill.files import atomic_write
from distill.models.config import DetectorConfig
from distill.models.detector import Detector
from distill.models.standard import StandardDetector, load_standard
from distill.spec import ARCHITECTURES, arch_config

FORMAT = "ld-service/1"

__all__ = [
    "FORMAT",
    "CheckpointError",
    "build_detector",
    "detector_state",
    "atomic_save",
    "read_checkpoint",
    "load_detector",
    "checkpoint_meta",
    "state_dict_of",
    "infer_config",
    "backbone_tensors",
]


def build_detector(
    arch: str, num_classes: int, classes: list[str] | None = None, *, frozen_stages: int = -1, norm_eval: bool = False
) -> Detector:
    """A freshly initialised detector of a named architecture (``<family>_<size>``: ``gfl_tiny``,
    ``retina_r50``, ``fcos_r18``, ...; ``distill.spec.ARCHITECTURES``).

    ``frozen_stages``/``norm_eval`` are mmdetection's backbone regime for pretrained weights
    (``distill.init`` loads those).
    """
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    cfg = DetectorConfig(
        **arch_config(arch),
        num_classes=num_classes,
        classes=list(classes or []),
        frozen_stages=frozen_stages,
        norm_eval=norm_eval,
    )
    return Detector(cfg, arch)


def detector_state(model: Detector, meta: dict | None = None) -> dict[str, Any]:
    """The checkpoint dict of a detector (without training state)."""
    return {
        "format": FORMAT,
        "arch": model.arch or "custom",
        "config": model.cfg.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and a rename: a crash never leaves a half-written checkpoint."""
    atomic_write(path, lambda f: torch.save(obj, f))


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a checkpoint without running pickled code.

    ``weights_only=True`` first; mmengine checkpoints may also carry objects (message hub, optimizer
    wrappers) that it refuses, so those are read with the reader's inert unpickler, allowing only torch's
    tensor rebuild functions: nothing else from the file is ever imported or called.
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


def state_dict_of(ckpt: dict[str, Any]) -> dict[str, Tensor]:
    """The largest tensor dict among the usual places (``state_dict``, ``model``, the checkpoint itself),
    as the torch-free reader finds it."""
    candidates = [ckpt] + [
        ckpt[k] for k in ("state_dict", "model", "model_state", "student", "weights") if isinstance(ckpt.get(k), dict)
    ]
    return max(
        ({k: v for k, v in c.items() if isinstance(k, str) and isinstance(v, Tensor)} for c in candidates), key=len
    )


def infer_config(state: dict[str, Tensor], meta: dict[str, Any] | None = None) -> DetectorConfig:
    """The :class:`DetectorConfig` of a detector's state dict, read off its shapes by the torch-free reader."""
    info = infer_architecture(state, meta)
    if info["depth"] is None:
        raise CheckpointError(f"unsupported backbone of width {info['base_width']}: not a ResNet-18/34/50/101")
    if info["reg_max"] < 1:
        raise CheckpointError(
            f"a {info['family']} head that regresses {4 * (info['reg_max'] + 1)} numbers per anchor, not edge "
            "distributions: not a checkpoint of this project's detectors"
        )
    return DetectorConfig(
        family=info["family"], depth=info["depth"], base_width=info["base_width"], channels=info["channels"],
        stacked_convs=info["stacked_convs"], num_classes=info["num_classes"], reg_max=info["reg_max"],
        strides=tuple(info["strides"]), classes=list(info["classes"] or []),
    )  # fmt: skip


def load_detector(
    source: str | os.PathLike | dict[str, Any], device: str | torch.device = "cpu", *, name: str | None = None
) -> Detector | StandardDetector:
    """An eval-mode detector of any family from a project checkpoint (a config without ``family`` is a GFL)
    or an mmdetection GFL/GFocalV2 checkpoint with distributions, or mmdetection's standard RetinaNet, FCOS or
    ATSS as trained (``distill.models.standard``; ``spread_teacher`` makes one a teacher): a file, or the dict
    ``read_checkpoint`` returned (so a caller that also wants ``checkpoint_meta`` reads the file once).
    ``name`` labels errors about a dict."""
    ckpt = source if isinstance(source, dict) else read_checkpoint(source)
    path = name or ("checkpoint" if isinstance(source, dict) else str(source))
    state = detector_tensors(state_dict_of(ckpt))
    if ckpt.get("format") == FORMAT:
        cfg = DetectorConfig.from_dict(ckpt["config"])  # also the inference settings we saved
        arch = ckpt.get("arch")
    else:
        if (info := infer_architecture(state, _plain_meta(ckpt))).get("form") == "standard":
            return load_standard(state, info, path).to(device)  # mmdetection's RetinaNet/FCOS/ATSS as trained
        cfg = infer_config(state, _plain_meta(ckpt))
        arch = infer_architecture(state)["name"] or f"{cfg.family}_r{cfg.depth}_w{cfg.base_width}_c{cfg.channels}"
    model = Detector(cfg, arch)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("integral.project")]  # a buffer mmdetection doesn't save
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: keys do not map onto a {cfg.family} detector: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    return model.to(device).eval()


def checkpoint_meta(source: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """Architecture facts of a checkpoint (arch, config, meta) without building the model; ``source`` is a
    file or the dict ``read_checkpoint`` returned."""
    ckpt = source if isinstance(source, dict) else read_checkpoint(source)
    if ckpt.get("format") == FORMAT:
        return {"arch": ckpt.get("arch"), "config": ckpt["config"], "meta": ckpt.get("meta", {})}
    state = detector_tensors(state_dict_of(ckpt))
    info = infer_architecture(state, _plain_meta(ckpt))
    if info.get("form") == "standard":  # no edge distributions: the config of its architecture, reg_max None
        config = {k: info[k] for k in ("family", "depth", "base_width", "channels", "stacked_convs", "num_classes")}
        config.update(reg_max=None, strides=list(info["strides"]), classes=list(info.get("classes") or []))
        return {"arch": info["name"], "config": config, "meta": {"source": "mmdetection", "form": "standard"}}
    cfg = infer_config(state, _plain_meta(ckpt))
    return {"arch": infer_architecture(state)["name"], "config": cfg.to_dict(), "meta": {"source": "mmdetection"}}


def _plain_meta(ckpt: dict[str, Any]) -> dict[str, Any]:
    meta = ckpt.get("meta")
    return meta if isinstance(meta, dict) else {}


class _TorchInertUnpickler(InertUnpickler):
    """The reader's inert unpickler with torch's real tensor rebuild functions allowed."""

    _ALLOWED = {
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch", "Size"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    }

    def allowed(self, module: str, name: str) -> Any | None:
        if (module, name) in self._ALLOWED or (module == "torch" and name.endswith("Storage")):
            return pickle.Unpickler.find_class(self, module, name)
        return None


class _InertPickle:
    """A ``pickle_module`` for ``torch.load`` whose unpickler never imports what the file names."""

    Unpickler = _TorchInertUnpickler
    UnpicklingError = pickle.UnpicklingError
    load = staticmethod(lambda f, **kw: _TorchInertUnpickler(f, **kw).load())

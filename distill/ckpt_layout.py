"""What a checkpoint holds: a GFL detector or a ResNet backbone, and its architecture (torch-free).

These functions see only key names and shapes, so they work alike on ``distill.ckpt_reader.TensorInfo``
(the API, which never loads tensor data) and on torch tensors (training, initialisation and export): one
prefix rule and one architecture table (``distill.spec``) for every room.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol, TypeVar

from distill.ckpt_reader import CheckpointError, read_checkpoint
from distill.spec import RESNET_LAYERS, arch_name

DETECTOR_PARTS = ("backbone.", "neck.", "bbox_head.")
# Wrappers some trainers put around the model: DataParallel/DDP, EMA and wrapper modules, a distiller.
_WRAPPERS = ("module.", "model.", "student.")
_BACKBONE_HEADS = ("fc.", "head.", "neck.", "bbox_head.")  # a classifier's (or detector's) layers past the body


class Shaped(Protocol):
    @property
    def shape(self) -> Any: ...


T = TypeVar("T", bound=Shaped)


def strip_wrappers(key: str) -> str:
    """``module.model.backbone.conv1.weight`` -> ``backbone.conv1.weight``."""
    while key.startswith(_WRAPPERS):
        key = key.split(".", 1)[1]
    return key


def detector_tensors(sd: dict[str, T]) -> dict[str, T]:
    """The tensors of a GFL detector, keyed like ``distill.models.gfl.GFL``'s state dict (which is
    mmdetection's layout): wrapper prefixes stripped, everything outside the detector dropped (for
    example a distiller's ``teacher.*``)."""
    out = {}
    for key, value in sd.items():
        key = strip_wrappers(key)
        if key.startswith(DETECTOR_PARTS):
            out[key] = value
    return out


def backbone_tensors(sd: dict[str, T]) -> dict[str, T]:
    """The tensors of a ResNet body keyed like torchvision's ResNet without its ``fc``: from torchvision's
    layout (``conv1.weight``, ``layer1.0...``) or mmdetection's/mmpretrain's (``backbone.conv1.weight``)."""
    out = {}
    for key, value in sd.items():
        key = strip_wrappers(key)
        key = key.removeprefix("backbone.")
        if not key.startswith(_BACKBONE_HEADS) and key.startswith(("conv1.", "bn1.", "layer")):
            out[key] = value
    return out


def _count(sd: dict[str, Any], pattern: str) -> int:
    return len({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})


def resnet_layout(body: dict[str, T]) -> tuple[int | None, int | None]:
    """``(depth, base width)`` of a ResNet body keyed like torchvision's; depth None when no known layout."""
    conv1 = body.get("conv1.weight")
    if conv1 is None or len(tuple(conv1.shape)) != 4:
        return None, None
    blocks = tuple(_count(body, rf"layer{i}\.(\d+)\.") for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in body
    depth = next((d for d, (layers, neck) in RESNET_LAYERS.items() if layers == blocks and neck == bottleneck), None)
    return depth, int(tuple(conv1.shape)[0])


def infer_gfl_architecture(sd: dict[str, T], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Describe the GFL detector of a state dict from its tensor shapes (and metadata where present).

    ``sd`` is any state dict (wrapped or not); ``meta`` the checkpoint's plain metadata. Returns a JSON-able
    dict: ``name`` (of ``distill.spec.ARCHITECTURES``, or None when the layout matches none), ``depth``,
    ``base_width``, ``channels``, ``stacked_convs``, ``num_classes``, ``reg_max``, ``strides``, ``classes``
    (from the metadata, else None), ``source`` ("mmdetection" or "project"), ``num_params``. Raises
    :class:`CheckpointError` if it is not a GFL detector's state dict.
    """
    meta = meta or {}
    det = detector_tensors(sd)

    def shape(key: str) -> tuple[int, ...] | None:
        t = det.get(key)
        return tuple(int(s) for s in t.shape) if t is not None else None

    conv1, cls_w, reg_w = (
        shape("backbone.conv1.weight"),
        shape("bbox_head.gfl_cls.weight"),
        shape("bbox_head.gfl_reg.weight"),
    )
    if conv1 is None or cls_w is None or reg_w is None or len(conv1) != 4 or len(reg_w) != 4:
        raise CheckpointError(
            "not a GFL detector checkpoint: expected keys backbone.conv1.weight, bbox_head.gfl_cls.weight "
            "and bbox_head.gfl_reg.weight (mmdetection's layout)"
        )
    if reg_w[0] % 4:
        raise CheckpointError(f"bbox_head.gfl_reg has {reg_w[0]} outputs, not 4 x (reg_max + 1)")
    depth, width = resnet_layout(backbone_tensors(det))
    num_levels = _count(det, r"bbox_head\.scales\.(\d+)\.") or _count(det, r"neck\.fpn_convs\.(\d+)\.")
    stacked = _count(det, r"bbox_head\.cls_convs\.(\d+)\.")
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    classes = _classes_from_meta(config) or _classes_from_meta(meta.get("meta") or {}) or _classes_from_meta(meta)
    strides = config.get("strides")
    if not (isinstance(strides, list | tuple) and strides and all(isinstance(x, int) for x in strides)):
        strides = [8 * 2**i for i in range(num_levels)]
    info: dict[str, Any] = {
        "kind": "detector",
        "depth": depth,
        "base_width": width,
        "channels": cls_w[1],
        "stacked_convs": stacked,
        "num_classes": cls_w[0],
        "reg_max": reg_w[0] // 4 - 1,
        "strides": list(strides),
        "classes": classes if classes and len(classes) == cls_w[0] else None,
        "source": "project" if str(meta.get("format", "")).startswith("ld-service") else "mmdetection",
        "num_params": sum(_numel(t.shape) for t in det.values()),
    }
    info["name"] = arch_name(depth, width or 0, info["channels"], stacked)
    return info


def infer_backbone(sd: dict[str, T]) -> dict[str, Any]:
    """Describe a ResNet backbone state dict (torchvision or mmdetection layout); raises :class:`CheckpointError`."""
    body = backbone_tensors(sd)
    depth, width = resnet_layout(body)
    if depth is None:
        raise CheckpointError(
            "neither a GFL detector nor a ResNet-18/34/50/101 backbone: expected bbox_head.gfl_cls/gfl_reg "
            "weights, or conv1.weight and layer1..layer4 (torchvision's or mmdetection's ResNet layout)"
        )
    layout = "mmdetection" if any(strip_wrappers(k).startswith("backbone.") for k in sd) else "torchvision"
    return {
        "kind": "backbone",
        "name": None,
        "depth": depth,
        "base_width": width,
        "layout": layout,
        "num_params": sum(_numel(t.shape) for t in body.values()),
    }


def describe_state(sd: dict[str, T], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """:func:`infer_gfl_architecture` for a detector, :func:`infer_backbone` for a ResNet body."""
    if "bbox_head.gfl_reg.weight" in detector_tensors(sd):
        return infer_gfl_architecture(sd, meta)
    return infer_backbone(sd)


def _numel(shape: Any) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _classes_from_meta(meta: dict[str, Any]) -> list[str] | None:
    if not isinstance(meta, dict):
        return None
    for holder in (meta, meta.get("dataset_meta") if isinstance(meta.get("dataset_meta"), dict) else {}):
        for k in ("classes", "CLASSES"):
            v = holder.get(k)
            if isinstance(v, list | tuple) and v and all(isinstance(c, str) for c in v):
                return list(v)
    return None


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """What an uploaded file holds (``describe_state`` of :func:`read_checkpoint`): the API's one call."""
    ckpt = read_checkpoint(path)
    return describe_state(ckpt.state_dict, ckpt.meta)

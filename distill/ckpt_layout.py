"""What a checkpoint holds: a dense detector of one of the families or a ResNet backbone, and its
architecture (torch-free).

These functions see only key names and shapes, so they work alike on ``distill.ckpt_reader.TensorInfo``
(the API, which never loads tensor data) and on torch tensors (training, initialisation and export): one
prefix rule and one architecture table (``distill.spec``) for every room.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol, TypeVar

from distill.ckpt_reader import CheckpointError, read_checkpoint
from distill.mmdet_standard import standard_form
from distill.spec import FAMILIES, NUM_ANCHORS, RESNET_LAYERS, arch_name

DETECTOR_PARTS = ("backbone.", "neck.", "bbox_head.")
# Wrappers some trainers put around the model: DataParallel/DDP, EMA and wrapper modules, a distiller.
_WRAPPERS = ("module.", "model.", "student.")
_BACKBONE_HEADS = ("fc.", "head.", "neck.", "bbox_head.")  # a classifier's (or detector's) layers past the body
# Each family's classification and box predictors, named as mmdetection's heads name them
# (``distill.models.*_head``); GFocalV2 is GFL's names plus its quality net ``reg_conf``.
PREDICTORS: dict[str, tuple[str, str]] = {
    "gfl": ("gfl_cls", "gfl_reg"),
    "gflv2": ("gfl_cls", "gfl_reg"),
    "atss": ("atss_cls", "atss_reg"),
    "fcos": ("conv_cls", "conv_reg"),
    "retina": ("retina_cls", "retina_reg"),
}
# The quality branch of the families that have one (GFocalV2's DGQP, FCOS's and ATSS's centerness).
QUALITY_LAYERS: dict[str, str] = {"gflv2": "reg_conf", "atss": "atss_centerness", "fcos": "conv_centerness"}
_GFLV2_KEY = "bbox_head.reg_conf.0.weight"


def head_family(det: dict[str, Any], config: dict[str, Any] | None = None) -> str | None:
    """The family of a detector's tensors (keys as :func:`detector_tensors` gives them): the saved config's
    ``family`` where there is one, else read off the predictors' key names; None for no known head."""
    family = (config or {}).get("family")
    if family in FAMILIES:
        return family
    for family, (cls, reg) in PREDICTORS.items():
        if f"bbox_head.{cls}.weight" in det and f"bbox_head.{reg}.weight" in det:
            return "gflv2" if family == "gfl" and _GFLV2_KEY in det else family
    return None


def class_layer(family: str) -> str:
    """The key prefix of a family's classification predictor (``bbox_head.gfl_cls.``, ...)."""
    return f"bbox_head.{PREDICTORS[family][0]}."


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


def infer_architecture(sd: dict[str, T], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Describe the detector of a state dict from its tensor shapes (and metadata where present).

    ``sd`` is any state dict (wrapped or not); ``meta`` the checkpoint's plain metadata. Returns a JSON-able
    dict: ``family`` (of ``distill.spec.FAMILIES``), ``name`` (of ``distill.spec.ARCHITECTURES``, or None
    when the layout matches none), ``depth``, ``base_width``, ``channels``, ``stacked_convs``,
    ``num_anchors``, ``num_classes``, ``reg_max`` (0 for a head that regresses 4 numbers per anchor rather
    than distributions, as mmdetection's standard RetinaNet/FCOS/ATSS), ``strides``, ``classes`` (from the
    metadata, else None), ``source`` ("mmdetection" or "project"), ``num_params``. Raises
    :class:`CheckpointError` if it is not a detector's state dict.
    """
    meta = meta or {}
    det = detector_tensors(sd)
    config = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    family = head_family(det, config)

    def shape(key: str) -> tuple[int, ...] | None:
        t = det.get(key)
        return tuple(int(s) for s in t.shape) if t is not None else None

    cls_name, reg_name = PREDICTORS[family] if family else PREDICTORS["gfl"]
    conv1, cls_w, reg_w = (
        shape("backbone.conv1.weight"),
        shape(f"bbox_head.{cls_name}.weight"),
        shape(f"bbox_head.{reg_name}.weight"),
    )
    if family is None or conv1 is None or cls_w is None or reg_w is None or len(conv1) != 4 or len(reg_w) != 4:
        heads = ", ".join(f"{f}: bbox_head.{c}/{r}" for f, (c, r) in PREDICTORS.items())
        raise CheckpointError(
            "not a detector checkpoint of a known family: expected backbone.conv1.weight and one head's "
            f"predictor weights (mmdetection's layout; {heads})"
        )
    anchors = NUM_ANCHORS[family]
    if reg_w[0] % (4 * anchors) or cls_w[0] % anchors:
        raise CheckpointError(f"bbox_head.{reg_name} has {reg_w[0]} outputs, not {anchors} anchors x 4 x (reg_max + 1)")
    depth, width = resnet_layout(backbone_tensors(det))
    num_levels = _count(det, r"bbox_head\.scales\.(\d+)\.") or _count(det, r"neck\.fpn_convs\.(\d+)\.")
    stacked = _count(det, r"bbox_head\.cls_convs\.(\d+)\.")
    classes = _classes_from_meta(config) or _classes_from_meta(meta.get("meta") or {}) or _classes_from_meta(meta)
    num_classes = cls_w[0] // anchors
    strides = config.get("strides")
    if not (isinstance(strides, list | tuple) and strides and all(isinstance(x, int) for x in strides)):
        strides = [8 * 2**i for i in range(num_levels)]
    info: dict[str, Any] = {
        "kind": "detector",
        "family": family,
        "depth": depth,
        "base_width": width,
        "channels": cls_w[1],
        "stacked_convs": stacked,
        "num_anchors": anchors,
        "num_classes": num_classes,
        "reg_max": reg_w[0] // (4 * anchors) - 1,
        "strides": list(strides),
        "classes": classes if classes and len(classes) == num_classes else None,
        "source": "project" if str(meta.get("format", "")).startswith("ld-service") else "mmdetection",
        "num_params": sum(_numel(t.shape) for t in det.values()),
    }
    info["name"] = arch_name(depth, width or 0, info["channels"], stacked, family)
    if info["reg_max"] == 0 and info["source"] == "mmdetection":
        # One number per edge: mmdetection's standard RetinaNet/FCOS/ATSS (form, options from its config text).
        info.update(standard_form(det, meta, info))
    return info


# The name GFL-only callers know.
infer_gfl_architecture = infer_architecture


def infer_backbone(sd: dict[str, T]) -> dict[str, Any]:
    """Describe a ResNet backbone state dict (torchvision or mmdetection layout); raises :class:`CheckpointError`."""
    body = backbone_tensors(sd)
    depth, width = resnet_layout(body)
    if depth is None:
        raise CheckpointError(
            "neither a detector nor a ResNet-18/34/50/101 backbone: expected a head's predictor weights "
            "(bbox_head.gfl_cls/gfl_reg, retina_cls/retina_reg, conv_cls/conv_reg or atss_cls/atss_reg), or "
            "conv1.weight and layer1..layer4 (torchvision's or mmdetection's ResNet layout)"
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
    """:func:`infer_architecture` for a detector, :func:`infer_backbone` for a ResNet body."""
    config = (meta or {}).get("config")
    if head_family(detector_tensors(sd), config if isinstance(config, dict) else None) is not None:
        return infer_architecture(sd, meta)
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

"""Initialising the model a job trains: from scratch, torchvision's ImageNet weights, or a checkpoint.

- ``"imagenet"``: the ResNet's ``IMAGENET1K_V1`` weights through torchvision's own weights API, so they
  come from its cache (``$TORCH_HOME/hub/checkpoints``, or ``weights_dir``) and are downloaded there once
  when the machine has internet.
- a checkpoint file: a detector (ours of any family, or mmdetection's, e.g. COCO-trained) initialises every
  tensor whose name and shape match; the class layer starts fresh when the classes differ. Across families
  the backbone, FPN and towers match, and the predictors of another family's head (other names) start fresh.
  A ResNet backbone state dict (torchvision's or mmdetection's layout) initialises the backbone.

Key names are normalised by the torch-free reader (``distill.ckpt_reader``), the same rule the API used
when the file was uploaded. The :class:`InitReport` says what was loaded and what started fresh; it goes
into the job's ``metrics.json``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torchvision
from torch import Tensor

from distill.checkpoint import read_checkpoint, state_dict_of
from distill.ckpt_layout import backbone_tensors, class_layer, describe_state, detector_tensors, resnet_layout
from distill.models.detector import Detector
from distill.spec import Init, InitCheckpoint, InitPath


@dataclass
class InitReport:
    """What an initialisation loaded into the model (``loaded``) and what kept its fresh values (``fresh``)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self, first: int = 5) -> dict[str, Any]:
        return {
            "source": self.source,
            "loaded": len(self.loaded),
            "fresh": len(self.fresh),
            "first_loaded": self.loaded[:first],
            "first_fresh": self.fresh[:first],
            "notes": self.notes,
        }


def imagenet_state(depth: int, weights_dir: str | os.PathLike[str] | None = None) -> dict[str, Tensor]:
    """torchvision's ``ResNet{depth}_Weights.IMAGENET1K_V1`` state dict, from its cache (downloaded once).

    ``weights_dir`` replaces torchvision's cache folder (``$TORCH_HOME/hub/checkpoints``).
    """
    weights = getattr(torchvision.models, f"ResNet{depth}_Weights").IMAGENET1K_V1
    model_dir = None if weights_dir is None else os.fspath(weights_dir)
    return weights.get_state_dict(progress=False, model_dir=model_dir, weights_only=True)


def initialise(model: Detector, init: Init | InitPath, weights_dir: str | os.PathLike[str] | None = None) -> InitReport:
    """Load ``init`` into ``model`` in place and report what was loaded.

    ``init`` is None (from scratch), ``"imagenet"``, or a checkpoint given by local path (the service
    resolves ``{"checkpoint": id}`` to a path before training). Raises ``ValueError`` when nothing of the
    checkpoint fits the model.
    """
    names = list(model.state_dict())
    if init is None:
        return InitReport("scratch", fresh=names)
    if init == "imagenet":
        return _load_backbone(model, imagenet_state(model.cfg.depth, weights_dir), f"imagenet:resnet{model.cfg.depth}")
    if isinstance(init, InitCheckpoint):
        raise ValueError("init {'checkpoint': id} must be resolved to a local path before training")
    ckpt = read_checkpoint(init.path)
    state = state_dict_of(ckpt)
    meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    if isinstance(ckpt.get("config"), dict):
        meta = {**meta, "config": ckpt["config"]}
    info = describe_state(state, meta)
    if info["kind"] == "backbone":
        return _load_backbone(model, state, f"backbone:{os.path.basename(init.path)}")
    return _load_detector(model, detector_tensors(state), info, f"detector:{os.path.basename(init.path)}")


def _load_backbone(model: Detector, state: dict[str, Tensor], source: str) -> InitReport:
    body = backbone_tensors(state)
    depth, width = resnet_layout(body)
    if (depth, width) != (model.cfg.depth, model.cfg.base_width):
        raise ValueError(
            f"{source}: a ResNet-{depth} of width {width} does not fit the backbone of {model.arch} "
            f"(ResNet-{model.cfg.depth}, width {model.cfg.base_width})"
        )
    own = model.backbone.state_dict()
    fits = {k: v for k, v in body.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.backbone.load_state_dict(fits, strict=False)
    loaded = [f"backbone.{k}" for k in fits]
    report = InitReport(source, loaded=loaded, fresh=[k for k in model.state_dict() if k not in set(loaded)])
    # BN's batch counters are absent from torchvision's files and unused (momentum is fixed): not a miss.
    missed = [k for k in own if k not in fits and not k.endswith("num_batches_tracked")]
    if missed:
        report.notes.append(f"{len(missed)} backbone tensors did not fit and start fresh: {missed[:5]}")
    return report


def _load_detector(model: Detector, state: dict[str, Tensor], info: dict[str, Any], source: str) -> InitReport:
    own = model.state_dict()
    theirs = info.get("classes")
    ours = model.cfg.classes
    # Without names on either side only the count can tell; with names, they must agree in order.
    same_names = not theirs or not ours or [c.lower() for c in theirs] == [c.lower() for c in ours]
    same_classes = info["num_classes"] == model.num_classes and same_names
    fits, notes = {}, []
    for k, v in state.items():
        if k not in own or tuple(v.shape) != tuple(own[k].shape):
            continue
        if not same_classes and k.startswith(class_layer(model.family)):
            continue
        fits[k] = v
    if not same_classes:
        notes.append(
            f"classes differ (checkpoint {info['num_classes']}: {(theirs or [])[:5]}, model "
            f"{model.num_classes}: {ours[:5]}): the class layer starts fresh"
        )
    if not any(k.startswith("backbone.") for k in fits):
        raise ValueError(
            f"{source}: its backbone (ResNet-{info['depth']}, width {info['base_width']}) does not fit "
            f"{model.arch} (ResNet-{model.cfg.depth}, width {model.cfg.base_width})"
        )
    model.load_state_dict(fits, strict=False)
    loaded = list(fits)
    return InitReport(source, loaded=loaded, fresh=[k for k in own if k not in fits], notes=notes)

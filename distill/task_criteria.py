"""Each detector family's own training losses, as a criterion object (DESIGN section 2; DETR's
``SetCriterion``): it owns the student's forward pass, the locations and preset anchors of each input size
(cached), the family's assigner and the loss weights (``JobSpec.loss``), so that a training step is
``losses = criterion(images, targets)``.

One base, :class:`TaskCriterion` (forward pass, locations, positives), and one small class per family that
says how it assigns and which losses it trains:

=========  ====================================  =============================================================
family     assignment                            losses
=========  ====================================  =============================================================
gfl        ATSS                                  QFL + GIoU + DFL
gflv2      ATSS                                  QFL on sigmoid(cls) x sigmoid(DGQP) + GIoU + DFL
atss       ATSS                                  focal + GIoU + DFL + centerness BCE
fcos       centre sampling + regression ranges   focal + GIoU + DFL + centerness BCE
retina     max IoU (0.5 / 0.4), 9 anchors        focal + GIoU + DFL
=========  ====================================  =============================================================

:data:`CRITERIA` maps a family to its class; :func:`task_criterion` picks the model's. The distillation terms
(:class:`distill.criterion.DistillCriterion`) sit on top of any of them and read the :class:`TaskState`:
the Main region is the family's own positives, the VLR's ``alpha_pos`` its positive threshold
(``Assignment.threshold``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from distill.assigners import Assignment, atss_assign, fcos_assign, max_iou_assign
from distill.losses.focal import focal_losses
from distill.losses.gfl import Positives, find_positives, gfl_losses
from distill.models.gfl import GFL
from distill.outputs import GroundTruth, HeadOutputs, head_outputs, pad_targets, valid_locations
from distill.spec import GFLWeights


@dataclass
class Locations:
    """The anchors of one input size, all levels concatenated, anchor-minor (``L*A`` rows)."""

    points: Tensor  # (L*A, 2) centres (x, y) in input pixels, each location's repeated A times
    strides: Tensor  # (L*A,)
    counts: list[int]  # anchors per level
    anchors: Tensor  # (L*A, 4) preset anchors (RetinaNet's nine; else one 8 x stride square, for assignment/VLR)


@dataclass
class TaskState:
    """What a family's losses of a batch found, for the distillation terms to reuse."""

    locations: Locations
    assignment: Assignment  # Main region = assignment.positive; VLR alpha_pos = assignment.threshold
    positives: Positives
    valid: Tensor  # (B, L*A) bool: the anchors inside each image's unpadded area (the padding mask)


class TaskCriterion:
    """The base: a family's losses for a student ``model``, weighted by ``weights`` (``JobSpec.loss``: ``cls``
    weighs the family's classification loss, QFL or focal). Subclasses define :meth:`assign` and
    :meth:`task_losses`."""

    def __init__(self, model: GFL, weights: GFLWeights, amp: bool = False):
        self.model, self.weights, self.amp = model, weights, amp
        self.adapters: nn.Module | None = None  # trainable parts of the criterion itself (none here)
        self._locations: dict[tuple, Locations] = {}

    def __call__(self, images: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        """Weighted losses of a batch: ``images (B, 3, H, W)``, the loader's per-image ``targets``."""
        losses, _ = self.losses(self.forward(images), pad_targets(targets, images.device))
        return losses

    def forward(self, images: Tensor, keep_feats: bool = False, tower_layer: int | None = None) -> HeadOutputs:
        """The student's outputs for ``images (B, 3, H, W)``; ``keep_feats``: also its FPN levels (FitNets);
        ``tower_layer``: also its tower features after that layer (CrossKD)."""
        return head_outputs(self.model, images, self.amp, keep_feats, tower_layer)

    def locations(self, sizes: tuple[tuple[int, int], ...], device: torch.device) -> Locations:
        """The anchors of maps of these ``sizes``, computed once per input size (by the model's own
        ``locations`` and ``anchors``, which read only the maps' shapes)."""
        key = (sizes, str(device))
        if key not in self._locations:
            shapes = [torch.empty((0, 0, h, w), device=device) for h, w in sizes]
            points, strides, counts = self.model.locations(shapes)
            self._locations[key] = Locations(points, strides, counts, self.model.anchors(points, strides))
        return self._locations[key]

    def losses(self, out: HeadOutputs, gt: GroundTruth) -> tuple[dict[str, Tensor], TaskState]:
        """The weighted terms of given outputs, and the state the distillation terms reuse."""
        loc = self.locations(out.sizes, out.cls.device)
        # The padding mask, once per batch: a padded location is never positive, and the classification loss
        # leaves it out (as mmdetection's valid flags): it is neither object nor background of any image.
        valid = valid_locations(loc.points, gt, out.cls.shape[0])
        with torch.no_grad():
            assignment = self.assign(loc, gt, valid)
            ignore = ~valid if assignment.ignore is None else assignment.ignore | ~valid
            assignment = replace(
                assignment,
                positive=assignment.positive & valid,
                gt_index=torch.where(valid, assignment.gt_index, -1),
                ignore=ignore,
            )
        pos = find_positives(out.reg, loc.points, loc.strides, assignment, gt.boxes, self.model.bbox_head.integral)
        return self.task_losses(out, pos, assignment, gt), TaskState(loc, assignment, pos, valid)

    def assign(self, loc: Locations, gt: GroundTruth, valid: Tensor | None = None) -> Assignment:
        """The family's positives of a batch, ``(B, L*A)``, and each box's positive threshold; ``valid``: the
        anchors inside each image (the padding mask), the only ones the assigner looks at."""
        raise NotImplementedError

    def task_losses(self, out: HeadOutputs, pos: Positives, assignment: Assignment, gt: GroundTruth) -> dict:
        """The family's weighted loss terms by name."""
        raise NotImplementedError


class GFLCriterion(TaskCriterion):
    """GFL: ATSS assignment; QFL + GIoU + DFL (:func:`distill.losses.gfl.gfl_losses`)."""

    def assign(self, loc: Locations, gt: GroundTruth, valid: Tensor | None = None) -> Assignment:
        return atss_assign(loc.anchors, loc.counts, gt.boxes, gt.valid, valid=valid)

    def task_losses(self, out: HeadOutputs, pos: Positives, assignment: Assignment, gt: GroundTruth) -> dict:
        return gfl_losses(out.cls, pos, gt.labels, self.weights, ignore=assignment.ignore)


class GFLv2Criterion(GFLCriterion):
    """GFocalV2: GFL whose QFL trains the joint score ``sigmoid(cls) * sigmoid(DGQP)``."""

    def task_losses(self, out: HeadOutputs, pos: Positives, assignment: Assignment, gt: GroundTruth) -> dict:
        return gfl_losses(out.cls, pos, gt.labels, self.weights, out.quality, ignore=assignment.ignore)


class ATSSCriterion(TaskCriterion):
    """ATSS: ATSS assignment; focal + GIoU + DFL + centerness (:func:`distill.losses.focal.focal_losses`)."""

    def assign(self, loc: Locations, gt: GroundTruth, valid: Tensor | None = None) -> Assignment:
        return atss_assign(loc.anchors, loc.counts, gt.boxes, gt.valid, valid=valid)

    def task_losses(self, out: HeadOutputs, pos: Positives, assignment: Assignment, gt: GroundTruth) -> dict:
        return focal_losses(out.cls, pos, gt.labels, self.weights, quality=out.quality, ignore=assignment.ignore)


class FCOSCriterion(ATSSCriterion):
    """FCOS: centre sampling and regression ranges (:func:`distill.assigners.fcos_assign`); the losses of ATSS.

    FCOS has no IoU threshold, so the VLR's ``alpha_pos`` (DESIGN section 3) is chosen: the threshold ATSS
    would set for the box on the same preset anchors (mean + std of its candidates' IoUs). It adapts to the
    box's size and shape as FCOS's positives do, and makes the VLR of the anchor-free families (gfl, gflv2,
    atss, fcos) mean the same thing, so a student's VLR does not change with the family of its teacher."""

    def assign(self, loc: Locations, gt: GroundTruth, valid: Tensor | None = None) -> Assignment:
        fcos = fcos_assign(loc.points, loc.strides, loc.counts, gt.boxes, gt.valid)  # points inside the boxes
        atss = atss_assign(loc.anchors, loc.counts, gt.boxes, gt.valid, valid=valid)
        return replace(fcos, threshold=atss.threshold, iou=atss.iou)


class RetinaCriterion(TaskCriterion):
    """RetinaNet: max-IoU assignment of its nine anchors per location (positive >= 0.5, negative < 0.4, the
    rest ignored; ``alpha_pos`` 0.5); focal + GIoU + DFL."""

    def assign(self, loc: Locations, gt: GroundTruth, valid: Tensor | None = None) -> Assignment:
        return max_iou_assign(loc.anchors, gt.boxes, gt.valid, valid=valid)

    def task_losses(self, out: HeadOutputs, pos: Positives, assignment: Assignment, gt: GroundTruth) -> dict:
        return focal_losses(out.cls, pos, gt.labels, self.weights, ignore=assignment.ignore)


CRITERIA: dict[str, type[TaskCriterion]] = {
    "gfl": GFLCriterion,
    "gflv2": GFLv2Criterion,
    "atss": ATSSCriterion,
    "fcos": FCOSCriterion,
    "retina": RetinaCriterion,
}


def task_criterion(model: GFL, weights: GFLWeights, amp: bool = False) -> TaskCriterion:
    """The criterion of ``model``'s family."""
    return CRITERIA[model.family](model, weights, amp)

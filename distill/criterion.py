"""The training criteria, in the style of DETR's ``SetCriterion``: an object that owns everything a loss
needs besides the batch, so that the training step is ``losses = criterion(images, targets)``.

- :class:`GFLCriterion`: the detector's own losses (QFL, GIoU, DFL; DESIGN section 2). It owns the
  student's forward pass, the locations and preset anchors of each input size (cached), the ATSS
  assigner and the loss weights (``JobSpec.loss``, every job kind).
- :class:`DistillCriterion`: a :class:`GFLCriterion` plus a frozen teacher (DESIGN section 3). It owns the
  teacher's forward pass (``eval()``, ``no_grad``, autocast on GPU), the regions (Main = the assigner's
  positives, VLR), the class correspondence of KD and the weighted LD / KD / TBR / FitNets terms
  (:mod:`distill.losses.ld`, :mod:`distill.losses.tbr`, :mod:`distill.losses.imitation`), the CrossKD
  (:mod:`distill.losses.crosskd`) and BCKD
  (:mod:`distill.losses.bckd`) terms, and the trainable adapters of FitNets and CrossKD.

Both return the weighted terms by name (a term whose weight is 0 is absent and was not computed); the
caller sums them. ``losses(outputs, gt)`` is the same without the forward passes, for given outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from distill.assigners import Assignment, atss_assign
from distill.class_map import ClassMap
from distill.locations import grid_locations, square_anchors
from distill.losses import bckd, crosskd, imitation
from distill.losses.gfl import Positives, find_positives, gfl_losses
from distill.losses.ld import region_kd, region_ld
from distill.losses.tbr import tbr_loss
from distill.models.gfl import GFL
from distill.regions import Regions, find_regions
from distill.spec import DistillSpec, GFLWeights, crosskd_default_layer, crosskd_layer_problem


@dataclass
class GroundTruth:
    """A batch's ground truths padded to the largest count ``G``."""

    boxes: Tensor  # (B, G, 4) x1y1x2y2 in input pixels, zeros for padding
    labels: Tensor  # (B, G) long: contiguous class index, 0 for padding
    valid: Tensor  # (B, G) bool: False for padding
    image_sizes: Tensor | None = None  # (B, 2) float (h, w) of each image before padding, when the loader gives it


def pad_targets(targets: list[dict], device: torch.device | str) -> GroundTruth:
    """The loader's per-image targets (``boxes (G_i, 4)``, ``labels (G_i,)``, optional unpadded ``size (h,
    w)``) -> a padded :class:`GroundTruth`."""
    g = max((len(t["labels"]) for t in targets), default=0)
    b = len(targets)
    boxes = torch.zeros((b, g, 4), device=device)
    labels = torch.zeros((b, g), dtype=torch.long, device=device)
    valid = torch.zeros((b, g), dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        k = len(t["labels"])
        boxes[i, :k] = t["boxes"].to(device)
        labels[i, :k] = t["labels"].to(device)
        valid[i, :k] = True
    sizes = None
    if targets and all("size" in t for t in targets):
        sizes = torch.tensor([list(t["size"]) for t in targets], dtype=torch.float32, device=device)
    return GroundTruth(boxes, labels, valid, sizes)


@dataclass
class HeadOutputs:
    """A detector's dense outputs for a batch, levels concatenated (``A`` locations), in float32."""

    cls: Tensor  # (B, A, C) class logits
    reg: Tensor  # (B, A, 4, R + 1) edge logits
    sizes: tuple[tuple[int, int], ...]  # (H_l, W_l) of each level's map
    feats: list[Tensor] | None = None  # FPN levels (B, channels, H_l, W_l), only when a term needs them
    # CrossKD: the (cls, reg) tower features after layer k, per level (B, channels, H_l, W_l), before the ReLU
    tower: tuple[list[Tensor], list[Tensor]] | None = None


def head_outputs(
    model: GFL, images: Tensor, amp: bool, keep_feats: bool = False, tower_layer: int | None = None
) -> HeadOutputs:
    """``model``'s outputs for normalised ``images (B, 3, H, W)``; ``amp``: bfloat16 autocast (GPU);
    ``tower_layer``: also keep the head's tower features after that layer (CrossKD)."""
    tower = None
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=amp):
        feats = model.features(images)
        if tower_layer is None:
            cls_maps, reg_maps = model.bbox_head(feats)
        else:
            cls_maps, reg_maps, cls_feats, reg_feats = model.bbox_head.forward_tower(feats, tower_layer)
            tower = (cls_feats, reg_feats)
        cls, reg = model.flatten(cls_maps, reg_maps)
    sizes = tuple((int(c.shape[-2]), int(c.shape[-1])) for c in cls_maps)
    return HeadOutputs(cls.float(), reg.float(), sizes, feats if keep_feats else None, tower)


@dataclass
class Locations:
    """The locations of one input size, all levels concatenated."""

    points: Tensor  # (A, 2) centres (x, y) in input pixels
    strides: Tensor  # (A,)
    counts: list[int]  # locations per level
    anchors: Tensor  # (A, 4) preset square anchors (8 x stride), for the assigner and the VLR only


@dataclass
class GFLState:
    """What the GFL losses of a batch found, for the distillation terms to reuse."""

    locations: Locations
    assignment: Assignment  # the student's ATSS assignment (Main region = assignment.positive)
    positives: Positives


class GFLCriterion:
    """GFL's QFL + GIoU + DFL for a student ``model``, weighted by ``weights`` (``JobSpec.loss``)."""

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
        """The locations and anchors of maps of these ``sizes``, computed once per input size."""
        key = (sizes, str(device))
        if key not in self._locations:
            points, strides, counts = grid_locations(list(sizes), list(self.model.strides), device)
            self._locations[key] = Locations(points, strides, counts, square_anchors(points, strides))
        return self._locations[key]

    def losses(self, out: HeadOutputs, gt: GroundTruth) -> tuple[dict[str, Tensor], GFLState]:
        """The weighted GFL terms of given outputs, and the state the distillation terms reuse."""
        loc = self.locations(out.sizes, out.cls.device)
        with torch.no_grad():
            assignment = atss_assign(loc.anchors, loc.counts, gt.boxes, gt.valid)
        pos = find_positives(out.reg, loc.points, loc.strides, assignment, gt.boxes, self.model.bbox_head.integral)
        return gfl_losses(out.cls, pos, gt.labels, self.weights), GFLState(loc, assignment, pos)


# The terms that compare class scores: they need a student class paired with a teacher class.
_CLASS_TERMS = ("main_kd", "vlr_kd", "crosskd_cls", "bckd_cls", "bckd_loc")


def valid_locations(points: Tensor, gt: GroundTruth, batch: int) -> Tensor:
    """``(B, A)`` bool: the locations ``points (A, 2)`` inside each image's unpadded area (all of them when the
    loader gave no sizes)."""
    if gt.image_sizes is None:
        return torch.ones((batch, points.shape[0]), dtype=torch.bool, device=points.device)
    h, w = gt.image_sizes[:, 0:1], gt.image_sizes[:, 1:2]  # (B, 1) each
    return (points[None, :, 0] < w) & (points[None, :, 1] < h)


class DistillCriterion:
    """A student's GFL losses (``gfl``) plus the distillation terms from a frozen ``teacher``, configured by
    ``spec`` (``JobSpec.distill``); ``classes`` pairs the student's classes with the teacher's for KD (the
    teacher must already have passed :func:`distill.teacher.check_teacher`)."""

    def __init__(self, gfl: GFLCriterion, teacher: GFL, spec: DistillSpec, classes: ClassMap):
        self.gfl, self.teacher, self.spec, self.classes = gfl, teacher, spec, classes
        student = gfl.model
        if classes.student and (
            max(classes.student) >= student.num_classes or max(classes.teacher) >= teacher.num_classes
        ):
            raise ValueError("class map indices outside the student's or the teacher's classes")
        # Frozen: no gradient, no optimiser, no batch-norm statistics update, never in the student's state.
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.keep_feats = imitation.needs_features(spec)
        # CrossKD's tower layer (None: CrossKD off): the student's features after it run through the teacher.
        self.crosskd_layer: int | None = None
        s_convs, t_convs = student.cfg.stacked_convs, teacher.cfg.stacked_convs
        if (
            spec.crosskd_layer is not None
            and (problem := crosskd_layer_problem(spec.crosskd_layer, s_convs, t_convs)) is not None
        ):
            raise ValueError(problem)
        if spec.weights.value("crosskd_cls") > 0 or spec.weights.value("crosskd_reg") > 0:
            self.crosskd_layer = (
                spec.crosskd_layer if spec.crosskd_layer is not None else crosskd_default_layer(s_convs, t_convs)
            )
        # Trainable parts of the criterion (optimised and checkpointed with the student, never exported).
        adapters: dict[str, nn.Module] = {}
        if (fitnets := imitation.build_adapters(student, teacher, spec)) is not None:
            adapters["fitnets"] = fitnets
        if self.crosskd_layer is not None and student.cfg.channels != teacher.cfg.channels:
            adapters["crosskd"] = crosskd.CrossKDAdapter(student.cfg.channels, teacher.cfg.channels)
        self.adapters = nn.ModuleDict(adapters).to(next(student.parameters()).device) if adapters else None
        self._columns: dict[str, tuple[Tensor, Tensor] | None] = {}
        # Where the teacher's outputs come from: None = its live forward pass; the teacher cache sets this to a
        # callable ``(images, targets) -> HeadOutputs`` that answers from (or fills) the cache.
        self.teacher_source: Callable[[Tensor, list[dict]], HeadOutputs] | None = None

    def class_report(self) -> dict:
        """KD's class correspondence for the job's metrics: mapping, unmapped classes, KD on or off."""
        w = self.spec.weights.value
        return self.classes.report(kd_weighted=any(w(k) > 0 for k in _CLASS_TERMS))

    def __call__(self, images: Tensor, targets: list[dict]) -> dict[str, Tensor]:
        """Weighted GFL and distillation losses of a batch: ``images (B, 3, H, W)``, per-image ``targets``."""
        student = self.gfl.forward(images, self.keep_feats, self.crosskd_layer)
        gt = pad_targets(targets, images.device)
        # CrossKD is never cached: its cross head needs the teacher's tower features of this very batch, so
        # with CrossKD on the teacher always runs live (the cache, if set, is bypassed).
        cached = self.teacher_source is not None and self.crosskd_layer is None
        teacher = self.teacher_source(images, targets) if cached else self.teacher_forward(images)
        return self.losses(student, teacher, gt)

    @torch.no_grad()
    def teacher_forward(self, images: Tensor) -> HeadOutputs:
        return head_outputs(self.teacher, images, self.gfl.amp, self.keep_feats, self.crosskd_layer)

    def losses(self, student: HeadOutputs, teacher: HeadOutputs, gt: GroundTruth) -> dict[str, Tensor]:
        """``qfl``, ``giou``, ``dfl``, then ``main_ld``, ``main_kd``, ``vlr_ld``, ``vlr_kd``, ``tbr``,
        ``fitnets``, ``crosskd_cls``, ``crosskd_reg``, ``bckd_cls``, ``bckd_loc``: those whose weight is above 0
        (the terms of :data:`_CLASS_TERMS` also need a class pair; LD, TBR and CrossKD's reg need no classes)."""
        losses, state = self.gfl.losses(student, gt)
        spec, w = self.spec, self.spec.weights.value
        kd_on = self.classes.kd_possible
        columns = self._kd_columns(student.cls.device) if kd_on else None
        pos = state.positives
        if w("main_ld") > 0:
            losses["main_ld"] = w("main_ld") * region_ld(student.reg, teacher.reg, pos.b, pos.a, None, spec.tau)
        if kd_on and w("main_kd") > 0:
            losses["main_kd"] = w("main_kd") * region_kd(
                student.cls, teacher.cls, pos.b, pos.a, None, spec.kd_tau, columns
            )
        vlr_ld, vlr_kd = w("vlr_ld") > 0, kd_on and w("vlr_kd") > 0
        if vlr_ld or vlr_kd:
            regions = self.regions(state, gt)
            vlr_b, vlr_a = regions.vlr.nonzero(as_tuple=True)
            vlr_w = regions.vlr_weight[vlr_b, vlr_a]
            if vlr_ld:
                losses["vlr_ld"] = w("vlr_ld") * region_ld(student.reg, teacher.reg, vlr_b, vlr_a, vlr_w, spec.tau)
            if vlr_kd:
                losses["vlr_kd"] = w("vlr_kd") * region_kd(
                    student.cls, teacher.cls, vlr_b, vlr_a, vlr_w, spec.kd_tau, columns
                )
        if w("tbr") > 0:
            losses["tbr"] = w("tbr") * tbr_loss(teacher.reg, pos, self.gfl.model.bbox_head.integral, spec.tbr_margin)
        if w("fitnets") > 0:
            if student.feats is None or teacher.feats is None or self.adapters is None:
                raise ValueError("FitNets needs student and teacher features and the adapters")
            losses["fitnets"] = w("fitnets") * imitation.fitnets_loss(
                student.feats, teacher.feats, self.adapters["fitnets"]
            )
        if any(w(k) > 0 for k in ("crosskd_cls", "crosskd_reg", "bckd_cls", "bckd_loc")):
            valid = valid_locations(state.locations.points, gt, student.cls.shape[0])
            losses.update(self._crosskd(student, teacher, valid, columns, kd_on))
            losses.update(self._bckd(student, teacher, state.locations, valid, columns, kd_on))
        return losses

    def _crosskd(
        self,
        student: HeadOutputs,
        teacher: HeadOutputs,
        valid: Tensor,
        columns: tuple[Tensor, Tensor] | None,
        kd_on: bool,
    ) -> dict[str, Tensor]:
        """``crosskd_cls`` (only over paired classes; off without a pair) and ``crosskd_reg``, weighted."""
        w, k = self.spec.weights.value, self.crosskd_layer
        cls_on, reg_on = kd_on and w("crosskd_cls") > 0, w("crosskd_reg") > 0
        if k is None or not (cls_on or reg_on):
            return {}
        if student.tower is None or teacher.tower is None:
            raise ValueError("CrossKD needs the student's and the teacher's tower features (a live teacher pass)")
        adapter = self.adapters["crosskd"] if self.adapters is not None and "crosskd" in self.adapters else None
        # Autograd stays on: the teacher's layers are frozen (requires_grad False) but pass the gradient on.
        with torch.autocast(student.cls.device.type, dtype=torch.bfloat16, enabled=self.gfl.amp):
            cross = self.teacher.flatten(
                *crosskd.cross_head(self.teacher.bbox_head, student.tower, teacher.tower, k, adapter)
            )
        cross_cls, cross_reg = cross[0].float(), cross[1].float()
        out = {}
        if cls_on:  # the cross head speaks the teacher's classes: compare the teacher's paired columns
            out["crosskd_cls"] = w("crosskd_cls") * crosskd.crosskd_cls_loss(
                cross_cls, teacher.cls, valid, self.spec.crosskd_beta, None if columns is None else columns[1]
            )
        if reg_on:
            out["crosskd_reg"] = w("crosskd_reg") * crosskd.crosskd_reg_loss(
                cross_reg, teacher.reg, teacher.cls, valid, self.spec.tau
            )
        return out

    def _bckd(
        self,
        student: HeadOutputs,
        teacher: HeadOutputs,
        loc: Locations,
        valid: Tensor,
        columns: tuple[Tensor, Tensor] | None,
        kd_on: bool,
    ) -> dict[str, Tensor]:
        """``bckd_cls`` and ``bckd_loc``, weighted; both need a class pair (the box weight is a class gap)."""
        w, out = self.spec.weights.value, {}
        if kd_on and w("bckd_cls") > 0:
            out["bckd_cls"] = w("bckd_cls") * bckd.bckd_cls_loss(
                student.cls, teacher.cls, valid, self.spec.bckd_beta, columns
            )
        if kd_on and w("bckd_loc") > 0:
            out["bckd_loc"] = w("bckd_loc") * bckd.bckd_loc_loss(
                student.reg,
                teacher.reg,
                student.cls,
                teacher.cls,
                loc.points / loc.strides[:, None],
                valid,
                self.gfl.model.bbox_head.integral,
                columns,
            )
        return out

    def regions(self, state: GFLState, gt: GroundTruth) -> Regions:
        """Main region and VLR of the batch, from the student's ATSS assignment (``state.assignment``)."""
        a = state.assignment
        return find_regions(state.locations.anchors, gt.boxes, gt.valid, a.positive, a.threshold, self.spec.gamma)

    def _kd_columns(self, device: torch.device) -> tuple[Tensor, Tensor] | None:
        """The paired class indices ``(M,)`` on ``device``; None when the classes are the same (no selection)."""
        key = str(device)
        if key not in self._columns:
            c = self.classes
            self._columns[key] = (
                None
                if c.identity
                else (
                    torch.tensor(c.student, dtype=torch.long, device=device),
                    torch.tensor(c.teacher, dtype=torch.long, device=device),
                )
            )
        return self._columns[key]

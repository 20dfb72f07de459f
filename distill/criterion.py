"""The distillation criterion (DESIGN section 3), in the style of DETR's ``SetCriterion``: an object that owns
everything a loss needs besides the batch, so that the training step is ``losses = criterion(images,
targets)``.

:class:`DistillCriterion` is a family's task criterion (:mod:`distill.task_criteria`: the student's forward
pass, assigner and own losses) plus a frozen teacher of any family with the same strides. It owns the
teacher's forward pass (``eval()``, ``no_grad``, autocast on GPU), the regions (Main = the student family's
positives, VLR from the student's preset anchors and its family's ``alpha_pos``), the class correspondence of
KD and the weighted LD / KD / TBR / FitNets terms (:mod:`distill.losses.ld`, :mod:`distill.losses.tbr`,
:mod:`distill.losses.imitation`), the CrossKD (:mod:`distill.losses.crosskd`) and BCKD
(:mod:`distill.losses.bckd`) terms, and the trainable adapters of FitNets and CrossKD.

Across families (:func:`distill.outputs.student_layout`): the teacher's outputs are put into the student's
rows (:mod:`distill.anchor_match`: 9 -> 1 by the teacher's most confident anchor, 1 -> 9 by repetition) and
its quality folded into its class score, so LD, KD, TBR and BCKD compare like with like; the student's side of
KD and BCKD is its own ranking score (class x quality for FCOS, ATSS, GFocalV2). CrossKD stays in the
teacher's own rows: its cross head is the teacher's, so its outputs are compared with the teacher's raw
outputs, whatever the student's family.

It returns the weighted terms by name (a term whose weight is 0 is absent and was not computed); the caller
sums them. ``losses(outputs, gt)`` is the same without the forward passes, for given outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from distill.boxes import distance_to_box
from distill.class_map import ClassMap
from distill.losses import bckd, crosskd, imitation, imitation_masks
from distill.losses.ld import region_kd, region_ld
from distill.losses.tbr import tbr_loss
from distill.models.gfl import GFL
from distill.outputs import GroundTruth, HeadOutputs, head_outputs, pad_targets, score_logits, student_layout
from distill.regions import Regions, find_regions
from distill.spec import DistillSpec, crosskd_default_layer, crosskd_layer_problem
from distill.task_criteria import Locations, TaskCriterion, TaskState

# The terms that compare class scores: they need a student class paired with a teacher class.
_CLASS_TERMS = ("main_kd", "vlr_kd", "crosskd_cls", "bckd_cls", "bckd_loc")


class DistillCriterion:
    """A student's own losses (``task``, its family's criterion) plus the distillation terms from a frozen
    ``teacher`` of any family, configured by ``spec`` (``JobSpec.distill``); ``classes`` pairs the student's
    classes with the teacher's for KD (the teacher must already have passed
    :func:`distill.teacher.check_teacher`)."""

    def __init__(self, task: TaskCriterion, teacher: GFL, spec: DistillSpec, classes: ClassMap):
        self.task, self.teacher, self.spec, self.classes = task, teacher, spec, classes
        student = task.model
        # Anchors per location of each side (RetinaNet 9, the others 1): distill.anchor_match's rule between them.
        self.teacher_anchors, self.student_anchors = teacher.num_anchors, student.num_anchors
        # A standard-form teacher (no distributions of its own) gives LD log-probabilities of a two-bin spread of
        # its decoded box: a temperature would flatten that target, so LD reads it at tau = 1 (DFL towards the
        # teacher's box, DESIGN section 2).
        self.ld_tau = 1.0 if getattr(teacher, "hard_edge_targets", False) else spec.tau
        if classes.student and (
            max(classes.student) >= student.num_classes or max(classes.teacher) >= teacher.num_classes
        ):
            raise ValueError("class map indices outside the student's or the teacher's classes")
        # Frozen: no gradient, no optimiser, no batch-norm statistics update, never in the student's state.
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        self.imitation = imitation.imitation_weights(spec.weights.value)
        self.keep_feats = bool(self.imitation)  # FPN features are kept only for feature imitation
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
        if self.imitation and (
            imit := imitation.build_adapters(student.cfg.channels, teacher.cfg.channels, len(student.strides))
        ):
            adapters["imitation"] = imit
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
        student = self.task.forward(images, self.keep_feats, self.crosskd_layer)
        gt = pad_targets(targets, images.device)
        # CrossKD is never cached: its cross head needs the teacher's tower features of this very batch, so
        # with CrossKD on the teacher always runs live (the cache, if set, is bypassed).
        cached = self.teacher_source is not None and self.crosskd_layer is None
        teacher = self.teacher_source(images, targets) if cached else self.teacher_forward(images)
        return self.losses(student, teacher, gt)

    @torch.no_grad()
    def teacher_forward(self, images: Tensor) -> HeadOutputs:
        """The teacher's own outputs (its rows, its quality apart) for ``images (B, 3, H, W)``."""
        return head_outputs(self.teacher, images, self.task.amp, self.keep_feats, self.crosskd_layer)

    def to_student(self, teacher: HeadOutputs) -> HeadOutputs:
        """The teacher's outputs in the student's rows with its quality folded into ``cls``
        (:func:`distill.outputs.student_layout`). Its anchors per location are read off its rows, so outputs
        already in the student's rows (the teacher cache's) pass through."""
        a_from = teacher.cls.shape[1] // max(sum(h * w for h, w in teacher.sizes), 1)
        return student_layout(teacher, a_from, self.student_anchors)

    def losses(self, student: HeadOutputs, teacher: HeadOutputs, gt: GroundTruth) -> dict[str, Tensor]:
        """The student family's own terms (``qfl`` or ``focal``, ``giou``, ``dfl``, ``centerness``), then
        ``main_ld``, ``main_kd``, ``vlr_ld``, ``vlr_kd``, ``tbr``, the imitation terms, ``crosskd_cls``,
        ``crosskd_reg``, ``bckd_cls``, ``bckd_loc``: those whose weight is above 0 (the terms of
        :data:`_CLASS_TERMS` also need a class pair; LD, TBR and CrossKD's reg need no classes).

        ``teacher``: the teacher's own outputs (:meth:`teacher_forward`) or already in the student's rows (the
        teacher cache's)."""
        losses, state = self.task.losses(student, gt)
        spec, w = self.spec, self.spec.weights.value
        kd_on = self.classes.kd_possible
        columns = self._kd_columns(student.cls.device) if kd_on else None
        raw, teacher = teacher, self.to_student(teacher)
        # KD and BCKD compare the scores each side ranks its detections by (class x quality where it has one).
        s_score = score_logits(student)
        pos = state.positives
        if w("main_ld") > 0:
            losses["main_ld"] = w("main_ld") * region_ld(student.reg, teacher.reg, pos.b, pos.a, None, self.ld_tau)
        if kd_on and w("main_kd") > 0:
            losses["main_kd"] = w("main_kd") * region_kd(s_score, teacher.cls, pos.b, pos.a, None, spec.kd_tau, columns)
        vlr_ld, vlr_kd = w("vlr_ld") > 0, kd_on and w("vlr_kd") > 0
        if vlr_ld or vlr_kd:
            regions = self.regions(state, gt)
            vlr_b, vlr_a = regions.vlr.nonzero(as_tuple=True)
            vlr_w = regions.vlr_weight[vlr_b, vlr_a]
            if vlr_ld:
                losses["vlr_ld"] = w("vlr_ld") * region_ld(student.reg, teacher.reg, vlr_b, vlr_a, vlr_w, self.ld_tau)
            if vlr_kd:
                losses["vlr_kd"] = w("vlr_kd") * region_kd(
                    s_score, teacher.cls, vlr_b, vlr_a, vlr_w, spec.kd_tau, columns
                )
        if w("tbr") > 0:
            losses["tbr"] = w("tbr") * tbr_loss(teacher.reg, pos, self.task.model.bbox_head.integral, spec.tbr_margin)
        if self.imitation:
            losses.update(self._imitation(student, teacher, state, gt))
        if any(w(k) > 0 for k in ("crosskd_cls", "crosskd_reg", "bckd_cls", "bckd_loc")):
            valid = state.valid
            losses.update(self._crosskd(student, raw, valid, columns, kd_on))
            losses.update(self._bckd(student, s_score, teacher, state.locations, valid, columns, kd_on))
        return losses

    def _imitation(
        self, student: HeadOutputs, teacher: HeadOutputs, state: TaskState, gt: GroundTruth
    ) -> dict[str, Tensor]:
        """The weighted feature-imitation terms (:mod:`distill.losses.imitation`); each region is built only
        when a term needs it."""
        if student.feats is None or teacher.feats is None:
            raise ValueError("feature imitation needs the student's and the teacher's FPN features")
        sizes, strides = list(student.sizes), list(self.task.model.strides)
        loc = state.locations

        def masks(name: str) -> list[Tensor]:
            if name == "inside_gt":
                return imitation_masks.inside_gt_masks(sizes, strides, gt.boxes, gt.valid)
            if name == "main_region":
                return imitation_masks.main_region_masks(state.assignment.positive, sizes, self.student_anchors)
            if name == "fine_grained":
                return imitation_masks.fine_grained_masks(loc.anchors, sizes, gt.boxes, gt.valid, self.student_anchors)
            # gi: where the two models' predictions disagree most, each box from the more confident model.
            integral = self.task.model.bbox_head.integral
            with torch.no_grad():
                boxes = [
                    distance_to_box(loc.points[None], integral(out.reg) * loc.strides[None, :, None])
                    for out in (teacher, student)
                ]
                # The scores each model ranks by (class x quality where the family has quality).
                probs = [score_logits(out).sigmoid() for out in (teacher, student)]
                if not self.classes.kd_possible:  # no class in common: compare the best scores
                    probs = [p.max(-1, keepdim=True).values for p in probs]
                elif (columns := self._kd_columns(student.cls.device)) is not None:
                    probs = [probs[0][..., columns[1]], probs[1][..., columns[0]]]
            instances = imitation_masks.general_instances(probs[0], probs[1], boxes[0], boxes[1], valid=state.valid)
            return imitation_masks.gi_masks(sizes, strides, instances)

        adapters = self.adapters["imitation"] if self.adapters is not None and "imitation" in self.adapters else None
        valid = imitation_masks.anchor_masks(state.valid, sizes, self.student_anchors)
        return imitation.imitation_losses(self.imitation, student.feats, teacher.feats, adapters, masks, valid)

    def _crosskd(
        self,
        student: HeadOutputs,
        teacher: HeadOutputs,
        valid: Tensor,
        columns: tuple[Tensor, Tensor] | None,
        kd_on: bool,
    ) -> dict[str, Tensor]:
        """``crosskd_cls`` (only over paired classes; off without a pair) and ``crosskd_reg``, weighted.
        ``teacher``: its own outputs; the cross head is the teacher's, so both sides are in the teacher's rows
        (``valid (B, L*A_S)``, the student's, is taken per location), whatever the student's family."""
        w, k = self.spec.weights.value, self.crosskd_layer
        cls_on, reg_on = kd_on and w("crosskd_cls") > 0, w("crosskd_reg") > 0
        if k is None or not (cls_on or reg_on):
            return {}
        if student.tower is None or teacher.tower is None:
            raise ValueError("CrossKD needs the student's and the teacher's tower features (a live teacher pass)")
        adapter = self.adapters["crosskd"] if self.adapters is not None and "crosskd" in self.adapters else None
        # Autograd stays on: the teacher's layers are frozen (requires_grad False) but pass the gradient on.
        with torch.autocast(student.cls.device.type, dtype=torch.bfloat16, enabled=self.task.amp):
            cross = self.teacher.flatten(
                *crosskd.cross_head(self.teacher.bbox_head, student.tower, teacher.tower, k, adapter)
            )
        cross_cls, cross_reg = cross[0].float(), cross[1].float()
        b = valid.shape[0]
        valid = valid.reshape(b, -1, self.student_anchors)[..., 0].repeat_interleave(self.teacher_anchors, 1)
        out = {}
        if cls_on:  # the cross head speaks the teacher's classes: compare the teacher's paired columns
            out["crosskd_cls"] = w("crosskd_cls") * crosskd.crosskd_cls_loss(
                cross_cls, teacher.cls, valid, self.spec.crosskd_beta, None if columns is None else columns[1]
            )
        if reg_on:
            out["crosskd_reg"] = w("crosskd_reg") * crosskd.crosskd_reg_loss(
                cross_reg, teacher.reg, score_logits(teacher), valid, self.ld_tau
            )
        return out

    def _bckd(
        self,
        student: HeadOutputs,
        s_score: Tensor,
        teacher: HeadOutputs,
        loc: Locations,
        valid: Tensor,
        columns: tuple[Tensor, Tensor] | None,
        kd_on: bool,
    ) -> dict[str, Tensor]:
        """``bckd_cls`` and ``bckd_loc``, weighted; both need a class pair (the box weight is a class gap).
        ``s_score``: the student's ranking score logits ``(B, L*A, C_S)``; ``teacher``: in the student's
        rows, its ``cls`` the teacher's score logits."""
        w, out = self.spec.weights.value, {}
        if kd_on and w("bckd_cls") > 0:
            out["bckd_cls"] = w("bckd_cls") * bckd.bckd_cls_loss(
                s_score, teacher.cls, valid, self.spec.bckd_beta, columns
            )
        if kd_on and w("bckd_loc") > 0:
            out["bckd_loc"] = w("bckd_loc") * bckd.bckd_loc_loss(
                student.reg,
                teacher.reg,
                s_score,
                teacher.cls,
                loc.points / loc.strides[:, None],
                valid,
                self.task.model.bbox_head.integral,
                columns,
            )
        return out

    def regions(self, state: TaskState, gt: GroundTruth) -> Regions:
        """Main region and VLR of the batch, from the student family's assignment (``state.assignment``: its
        positives, and its ``alpha_pos`` per box) and the student's preset anchors (RetinaNet: per anchor)."""
        a = state.assignment
        regions = find_regions(state.locations.anchors, gt.boxes, gt.valid, a.positive, a.threshold, self.spec.gamma)
        # Padding is no region: a padded location's anchor can still overlap a box at the image's edge.
        regions.vlr &= state.valid
        regions.vlr_weight = regions.vlr_weight * state.valid
        regions.vlr_gt = torch.where(state.valid, regions.vlr_gt, -1)
        return regions

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

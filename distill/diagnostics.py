"""Diagnostics of distillation (paper figure 4): how far the student's outputs are from the teacher's, per
FPN level, on a validation loader."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.class_map import ClassMap
from distill.models.gfl import GFL
from distill.outputs import head_outputs, score_logits, student_layout


@torch.no_grad()
def diagnostics(
    student: GFL, teacher: GFL, loader: Iterable, device: torch.device | str, classes: ClassMap | None = None
) -> dict:
    """Paper figure 4: per FPN level, the mean L1 error between teacher and student over a loader.

    - ``cls_l1``: ``|sigmoid(z_S) - sigmoid(z_T)|`` averaged over locations and the classes that ``classes``
      pairs (None: the same columns, same classes); None when no class pairs (a teacher of other classes);
    - ``box_l1``: the L1 distance between the edge distributions, ``sum_i |softmax(z_S)_i - softmax(z_T)_i|``
      (in ``[0, 2]``), averaged over locations and the four edges.

    Any two families with the same strides compare: the teacher's outputs are put into the student's rows
    (:func:`distill.outputs.student_layout`, the rule of :mod:`distill.anchor_match`) and each side's class
    score is the one it ranks by (class x quality for FCOS, ATSS, GFocalV2). Only locations inside each
    image's unpadded area count. Both models run in eval mode; the student's
    train/eval mode is restored afterwards. Returns ``{"strides", "cls_l1", "box_l1"}`` (lists over the
    levels), their location-weighted means ``cls_l1_mean``, ``box_l1_mean``, and ``images``.
    """
    was_training = student.training
    student.eval()
    teacher.eval()
    device = torch.device(device)
    num_levels = len(student.strides)
    cls_sum = torch.zeros(num_levels, dtype=torch.float64)
    box_sum = torch.zeros(num_levels, dtype=torch.float64)
    count = torch.zeros(num_levels, dtype=torch.float64)
    images_seen = 0
    no_class = classes is not None and not classes.kd_possible
    try:
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            s_out = head_outputs(student, images, amp=False)
            t_out = student_layout(head_outputs(teacher, images, amp=False), teacher.num_anchors, student.num_anchors)
            s_cls, s_reg, t_cls, t_reg = score_logits(s_out), s_out.reg, t_out.cls, t_out.reg
            shapes = [torch.empty((0, 0, h, w), device=device) for h, w in s_out.sizes]
            points, _, counts = student.locations(shapes)
            sizes = torch.tensor(
                [list(t.get("size", images.shape[-2:])) for t in targets], device=device, dtype=torch.float32
            )  # (B, 2) unpadded (h, w)
            inside = (points[None, :, 0] < sizes[:, None, 1]) & (points[None, :, 1] < sizes[:, None, 0])  # (B, A)
            box_err = (F.softmax(s_reg.float(), -1) - F.softmax(t_reg.float(), -1)).abs().sum(-1).mean(-1)
            if classes is not None and not classes.identity:
                s_cls, t_cls = s_cls[..., list(classes.student)], t_cls[..., list(classes.teacher)]
            cls_err = (
                (s_cls.float().sigmoid() - t_cls.float().sigmoid()).abs().mean(-1)
                if not no_class
                else torch.zeros_like(box_err)
            )  # (B, A)
            level = torch.repeat_interleave(
                torch.arange(num_levels, device=device), torch.tensor(counts, device=device)
            )  # (A,)
            cls_sum += _sum_per_level(cls_err, inside, level, num_levels)
            box_sum += _sum_per_level(box_err, inside, level, num_levels)
            count += _sum_per_level(torch.ones_like(cls_err), inside, level, num_levels)
            images_seen += images.shape[0]
    finally:
        student.train(was_training)
    safe = count.clamp(min=1)
    total = max(float(count.sum()), 1.0)
    return {
        "strides": list(student.strides),
        "cls_l1": None if no_class else [round(float(v), 6) for v in cls_sum / safe],
        "box_l1": [round(float(v), 6) for v in box_sum / safe],
        "cls_l1_mean": None if no_class else round(float(cls_sum.sum()) / total, 6),
        "box_l1_mean": round(float(box_sum.sum()) / total, 6),
        "images": images_seen,
    }


def _sum_per_level(values: Tensor, inside: Tensor, level: Tensor, num_levels: int) -> Tensor:
    """``values (B, A)`` summed over the images' unpadded locations (``inside (B, A)``) of each level
    (``level (A,)``) -> ``(num_levels,)`` float64 on the CPU."""
    sums = torch.zeros(num_levels, dtype=torch.float64, device=values.device)
    return sums.index_add_(0, level, (values.double() * inside).sum(0)).cpu()

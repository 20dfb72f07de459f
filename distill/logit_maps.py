"""The paper's figure 5: where on an image the student's box logits are far from the teacher's.

Per location of the chosen FPN levels (P5 and P6 by default, strides 32 and 64), the L1 error between the
student's and the teacher's box logits, summed over the bins and the four edges. Each edge's logits are
normalised by log-softmax first: softmax ignores a constant added to all of an edge's logits, so that constant
is not an error (and a standard-form teacher's two-bin targets, :mod:`distill.mmdet_standard`, are
log-probabilities already). A student with several anchors per location shows their mean; the teacher's
outputs are put into the student's rows first (:func:`distill.outputs.student_layout`).

Computed for one validation image, before distillation (the initial student) and after it, and stored in the
job's metrics; the service draws them over that image.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.models.gfl import GFL
from distill.outputs import head_outputs, student_layout

FIG5_STRIDES = (32, 64)


@torch.no_grad()
def logit_error_maps(
    student: GFL, teacher: GFL, images: Tensor, strides: tuple[int, ...] = FIG5_STRIDES
) -> list[Tensor]:
    """``images (1, 3, H, W)`` -> per stride in ``strides`` a map ``(H_l, W_l)`` of the summed L1 error."""
    was_training = student.training
    student.eval()
    teacher.eval()
    try:
        s = head_outputs(student, images, amp=False)
        t = student_layout(head_outputs(teacher, images, amp=False), teacher.num_anchors, student.num_anchors)
    finally:
        student.train(was_training)
    err = (F.log_softmax(s.reg, -1) - F.log_softmax(t.reg, -1)).abs().sum((-1, -2))[0]  # (L*A,)
    a = student.num_anchors
    counts = [h * w * a for h, w in s.sizes]
    levels = dict(zip(student.strides, err.split(counts), strict=True))
    out = []
    for stride in strides:
        if stride not in levels:
            raise ValueError(f"the student has no level of stride {stride} (strides {list(student.strides)})")
        h, w = s.sizes[list(student.strides).index(stride)]
        out.append(levels[stride].reshape(h, w, a).mean(-1).cpu())
    return out


def first_validation_image(loader: Iterable) -> tuple[Tensor, dict[str, Any]]:
    """The first image of a validation loader, ``(1, 3, H, W)`` cropped to its unpadded size rounded up to
    32, and its target (``image_id``, ``size``, ``scale``)."""
    images, targets = next(iter(loader))
    h, w = targets[0]["size"]
    crop_h, crop_w = -(-int(h) // 32) * 32, -(-int(w) // 32) * 32
    return images[:1, :, :crop_h, :crop_w], targets[0]


def figure5(student: GFL, teacher: GFL, loader: Iterable, device: torch.device | str) -> dict[str, Any]:
    """The maps of :func:`logit_error_maps` on the loader's first image, JSON-ready: ``image_id``, the image's
    resized ``size`` (h, w) and ``scale`` (input pixels per original pixel), ``strides``, and ``maps`` (per
    stride a list of rows, 4 decimals)."""
    image, target = first_validation_image(loader)
    maps = logit_error_maps(student, teacher, image.to(device))
    return {
        "image_id": int(target["image_id"]),
        "size": [int(v) for v in target["size"]],
        "scale": float(target.get("scale", 1.0)),
        "strides": list(FIG5_STRIDES),
        "maps": [[[round(float(v), 4) for v in row] for row in m.tolist()] for m in maps],
    }

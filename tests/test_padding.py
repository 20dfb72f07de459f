"""Padding is masked (issue 21): one valid-location mask per batch keeps the padded part of the canvas out of
assignment, the classification loss, the VLR and the distillation terms, worked on a hand-made batch."""

from __future__ import annotations

import pytest
import torch

from distill.checkpoint import build_detector
from distill.class_map import map_classes
from distill.criterion import DistillCriterion
from distill.outputs import GroundTruth, head_outputs, valid_locations
from distill.spec import DistillSpec, GFLWeights
from distill.task_criteria import task_criterion


def _batch() -> tuple[torch.Tensor, GroundTruth]:
    """Two images on a 128 x 96 (w x h) canvas: a full one, and a 48 x 40 one whose padding covers 84% of the
    canvas, with a box reaching its bottom-right corner (anchors past the corner overlap it)."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 96, 128)
    images[1, :, 40:, :] = 0.0
    images[1, :, :, 48:] = 0.0
    boxes = torch.tensor([[[10.0, 10.0, 60.0, 70.0]], [[16.0, 12.0, 48.0, 40.0]]])
    sizes = torch.tensor([[96.0, 128.0], [40.0, 48.0]])
    return images, GroundTruth(boxes, torch.tensor([[0], [1]]), torch.ones(2, 1, dtype=torch.bool), sizes)


@pytest.mark.parametrize("arch", ["gfl_tiny", "atss_tiny", "retina_tiny"])
def test_no_positive_no_vlr_and_no_loss_in_the_padding(arch):
    images, gt = _batch()
    model = build_detector(arch, 2, ["a", "b"])
    teacher = build_detector(arch, 2, ["a", "b"])
    criterion = DistillCriterion(
        task_criterion(model, GFLWeights()), teacher, DistillSpec(), map_classes(model.classes, teacher.classes)
    )
    out = head_outputs(model, images, amp=False)
    losses, state = criterion.task.losses(out, gt)
    padded = ~valid_locations(state.locations.points, gt, 2)
    assert padded[1].float().mean() > 0.5 and not padded[0].any()  # most of image 1's canvas is padding
    assert state.assignment.positive[1].any() and not (state.assignment.positive & padded).any()
    regions = criterion.regions(state, gt)
    assert regions.vlr[1].any() and not (regions.vlr & padded).any() and (regions.vlr_weight[padded] == 0).all()
    # Whatever the detector says in the padding costs nothing: the classification loss leaves it out.
    louder = out.cls.clone()
    louder[padded] += 5.0
    changed, _ = criterion.task.losses(type(out)(**{**out.__dict__, "cls": louder}), gt)
    cls_term = next(k for k in losses if k in ("qfl", "focal"))
    assert changed[cls_term].item() == pytest.approx(losses[cls_term].item(), rel=1e-6)


def test_imitation_and_gi_ignore_the_padding():
    from distill.losses import imitation
    from distill.losses import imitation_masks as masks

    images, gt = _batch()
    sizes, strides = [(12, 16), (6, 8)], [8, 16]
    t = [torch.randn(2, 8, h, w) for h, w in sizes]
    s = [x.clone() for x in t]
    valid = [
        masks.inside_boxes(p, torch.tensor([[[0.0, 0.0, 128, 96]], [[0.0, 0.0, 48, 40]]]), gt.valid)
        .reshape(2, h, w)
        .float()
        for p, (h, w) in zip(masks.level_points(sizes, strides, torch.device("cpu")), sizes, strict=True)
    ]
    for x, v in zip(s, valid, strict=True):
        x[v[:, None].expand_as(x) == 0] += 3.0  # the student differs from the teacher in the padding only
    assert imitation.fitnets_loss(s, t, valid).item() == pytest.approx(0.0, abs=1e-6)
    assert imitation.pkd_loss(s, t, valid).item() == pytest.approx(0.0, abs=1e-5)
    assert imitation.fitnets_loss(s, t).item() > 1.0  # unmasked, it would imitate the padding
    n = 10
    probs_t, probs_s = torch.zeros(1, n, 1), torch.zeros(1, n, 1)
    probs_t[0, 3] = 0.9  # the largest disagreement, at an anchor in the padding
    probs_t[0, 5] = 0.5
    boxes = torch.tensor([[i * 10.0, 0.0, i * 10.0 + 8, 8.0] for i in range(n)])[None]
    ok = torch.ones(1, n, dtype=torch.bool)
    ok[0, 3] = False
    (kept,) = masks.general_instances(probs_t, probs_s, boxes, boxes, top_k=1, valid=ok)
    assert kept.tolist() == [[50.0, 0.0, 58.0, 8.0]]

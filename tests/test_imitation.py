"""Feature imitation (paper table 3, and PKD): each term is 0 when the student's features equal the teacher's,
its region is right on hand-made boxes, gradients reach the student (and the adapter) and never the teacher,
and the adapter exists only when the widths differ."""

from __future__ import annotations

import pytest
import torch

from distill.losses import imitation
from distill.losses import imitation_masks as masks
from distill.spec import IMITATION_TERMS, DistillSpec, JobSpec, teacher_cache_blocker

SIZES = [(4, 6), (2, 3)]  # two levels of a 32 x 48 input
STRIDES = [8, 16]


def _feats(channels: int, seed: int, requires_grad: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, channels, h, w, generator=g).requires_grad_(requires_grad) for h, w in SIZES]


def _gt() -> tuple[torch.Tensor, torch.Tensor]:
    # Image 0: one box over cells x in [0, 16], y in [0, 8] at stride 8; image 1: no box (one padding row).
    boxes = torch.tensor([[[0.0, 0.0, 16.0, 8.0]], [[0.0, 0.0, 0.0, 0.0]]])
    valid = torch.tensor([[True], [False]])
    return boxes, valid


def test_inside_gt_mask_by_hand():
    boxes, valid = _gt()
    fine, coarse = masks.inside_gt_masks(SIZES, STRIDES, boxes, valid)
    # Stride 8: centres (4, 4) and (12, 4) lie in the box, (20, 4) does not; row y = 12 is outside.
    expected = torch.zeros(4, 6)
    expected[0, 0] = expected[0, 1] = 1
    assert torch.equal(fine[0], expected) and fine[1].sum() == 0
    # Stride 16: the centre (8, 8) lies on the box's bottom edge (inclusive), (24, 8) does not.
    assert coarse[0, 0, 0] == 1 and coarse[0].sum() == 1 and coarse[1].sum() == 0


def test_fine_grained_mask_keeps_the_anchors_near_each_boxs_best():
    # One level 2 x 2 at stride 8, anchors 16 x 16 centred on the cells.
    points = masks.level_points([(2, 2)], [8], torch.device("cpu"))[0]
    anchors = torch.cat([points - 8, points + 8], 1)  # (4, 4)
    boxes = torch.tensor([[[0.0, 0.0, 12.0, 12.0]]])
    valid = torch.tensor([[True]])
    (m,) = masks.fine_grained_masks(anchors, [(2, 2)], boxes, valid, psi=0.5)
    # IoUs with the box: (-4,-4,12,12) -> 144/256 = 0.56 is the best, so the bar is 0.28; (4,-4,20,12) and
    # (-4,4,12,20) -> 96/304 = 0.32 pass; (4,4,20,20) -> 64/336 = 0.19 does not.
    assert m[0].tolist() == [[1.0, 1.0], [1.0, 0.0]]


def test_main_region_mask_is_any_anchor_of_a_location():
    positive = torch.zeros(1, (4 * 6 + 2 * 3) * 2, dtype=torch.bool)  # 2 anchors per location
    positive[0, 3] = True  # location 1 of level 0, its second anchor
    positive[0, 48 + 1] = True  # location 0 of level 1
    fine, coarse = masks.main_region_masks(positive, SIZES, num_anchors=2)
    assert fine[0, 0, 1] == 1 and fine.sum() == 1 and coarse[0, 0, 0] == 1 and coarse.sum() == 1


def test_general_instances_pick_the_largest_disagreement_and_suppress_duplicates():
    t_scores = torch.tensor([[[0.9], [0.85], [0.1], [0.5]]])
    s_scores = torch.tensor([[[0.1], [0.15], [0.1], [0.4]]])
    t_boxes = torch.tensor([[[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.0], [20, 20, 30, 30], [40, 40, 50, 50]]])
    s_boxes = t_boxes + 1.0
    (kept,) = masks.general_instances(t_scores, s_scores, t_boxes, s_boxes, top_k=2, nms_iou=0.3)
    # GI 0.8 and 0.7 at two boxes that overlap (one survives, the teacher's: it is the more confident), then 0.1.
    assert kept.tolist() == [[0.0, 0.0, 10.0, 10.0], [40.0, 40.0, 50.0, 50.0]]


@pytest.mark.parametrize("term", IMITATION_TERMS)
def test_each_term_is_zero_when_the_student_equals_the_teacher(term):
    boxes, valid = _gt()
    t = _feats(8, 0)
    s = [x.clone() for x in t]
    region = masks.inside_gt_masks(SIZES, STRIDES, boxes, valid)
    losses = imitation.imitation_losses({term: 1.0}, s, t, None, lambda name: region)
    assert losses[term].item() == pytest.approx(0.0, abs=1e-6)


def test_pkd_ignores_a_per_channel_affine_change_and_mse_does_not():
    t = _feats(8, 0)
    s = [x * 3.0 + 2.0 for x in t]
    assert imitation.pkd_loss(s, t).item() == pytest.approx(0.0, abs=1e-5)
    assert imitation.fitnets_loss(s, t).item() > 1.0


def test_masked_terms_see_only_their_region_and_empty_regions_give_zero():
    boxes, valid = _gt()
    t = _feats(8, 0)
    s = [x.clone() for x in t]
    region = masks.inside_gt_masks(SIZES, STRIDES, boxes, valid)
    s[0].data[1] += 5.0  # image 1 has no box: inside_gt must not see the change, fitnets and DeFeat must
    assert imitation.masked_mse(s, t, region).item() == pytest.approx(0.0, abs=1e-6)
    assert imitation.fitnets_loss(s, t).item() > 1.0
    assert imitation.defeat_loss(s, t, region).item() > 1.0
    empty = [torch.zeros_like(m) for m in region]
    assert imitation.masked_mse(_feats(8, 1), t, empty).item() == 0.0


@pytest.mark.parametrize("term", IMITATION_TERMS)
def test_gradients_reach_the_student_and_the_adapter_never_the_teacher(term):
    boxes, valid = _gt()
    s = _feats(4, 1, requires_grad=True)
    t = _feats(8, 0, requires_grad=True)
    adapters = imitation.build_adapters(4, 8, len(SIZES))
    assert adapters is not None and adapters[0].weight.shape == (8, 4, 1, 1)
    region = masks.inside_gt_masks(SIZES, STRIDES, boxes, valid)
    loss = imitation.imitation_losses({term: 1.0}, s, t, adapters, lambda name: region)[term]
    loss.backward()
    assert loss.item() > 0
    assert s[0].grad is not None and s[0].grad.abs().sum() > 0
    assert adapters[0].weight.grad is not None and adapters[0].weight.grad.abs().sum() > 0
    assert all(x.grad is None for x in t)


def test_adapter_only_when_widths_differ_and_it_is_checkpointable():
    assert imitation.build_adapters(8, 8, 5) is None
    adapters = imitation.build_adapters(4, 8, 5)
    assert adapters is not None and len(adapters) == 5
    state = adapters.state_dict()
    again = imitation.build_adapters(4, 8, 5)
    assert again is not None
    again.load_state_dict(state)
    assert all(torch.equal(a.weight, b.weight) for a, b in zip(adapters, again, strict=True))


def test_imitation_needs_a_live_teacher():
    for term in IMITATION_TERMS:
        job = JobSpec.model_validate(
            {
                "kind": "distill",
                "dataset": "ds_00000000",
                "teacher": {"job": "job_00000000"},
                "distill": {"weights": {term: 1.0}},
            }
        )
        why = teacher_cache_blocker(job)
        assert why is not None and term in why
    plain = JobSpec.model_validate({"kind": "distill", "dataset": "ds_00000000", "teacher": {"job": "job_00000000"}})
    assert teacher_cache_blocker(plain) is None and isinstance(plain.distill, DistillSpec)


# ----------------------------------------------------------------------------------- in the criterion


def _targets(batch: int) -> list[dict]:
    boxes = torch.tensor([[10.0, 12, 60, 70], [70, 20, 120, 90]])
    return [{"boxes": boxes, "labels": torch.tensor([0, 1]), "size": (96, 128)} for _ in range(batch)]


@pytest.mark.parametrize(("student_arch", "teacher_arch"), [("retina_tiny", "fcos_small"), ("gflv2_tiny", "gfl_tiny")])
def test_every_imitation_alone_and_beside_ld_across_families(student_arch, teacher_arch):
    from distill.checkpoint import build_detector
    from distill.class_map import map_classes
    from distill.criterion import DistillCriterion
    from distill.spec import GFLWeights
    from distill.task_criteria import task_criterion

    torch.manual_seed(0)
    student, teacher = build_detector(student_arch, 2, ["a", "b"]), build_detector(teacher_arch, 2, ["a", "b"])
    images = torch.randn(2, 3, 96, 128)
    for term in IMITATION_TERMS:
        for beside_ld in (False, True):
            weights = {term: 1.0} if beside_ld else {"main_ld": 0, "vlr_ld": 0, "main_kd": 0, term: 1.0}
            spec = DistillSpec.model_validate({"weights": weights})
            criterion = DistillCriterion(
                task_criterion(student, GFLWeights()), teacher, spec, map_classes(student.classes, teacher.classes)
            )
            widths_differ = student.cfg.channels != teacher.cfg.channels
            assert (criterion.adapters is not None and "imitation" in criterion.adapters) == widths_differ
            losses = criterion(images, _targets(2))
            assert term in losses and torch.isfinite(losses[term]) and losses[term] > 0, (term, losses)
            assert ({"main_ld", "vlr_ld", "main_kd"} <= set(losses)) == beside_ld
            student.zero_grad()
            losses[term].backward()
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.backbone.parameters())
            assert all(p.grad is None for p in teacher.parameters())

"""Training every detector family (issue 18, DESIGN section 2): the assigners on cases worked by hand, each
task loss against a value computed by hand, each family's criterion, a tiny model of each family that
learns a few synthetic images, and exact resume."""

import math

import pytest
import torch

from distill.assigners import atss_assign, fcos_assign, max_iou_assign
from distill.boxes import aligned_giou
from distill.checkpoint import build_detector, read_checkpoint
from distill.data.synthetic import make_synthetic
from distill.losses.centerness import centerness_loss, centerness_target
from distill.losses.focal import focal_loss, focal_losses
from distill.losses.gfl import Positives, quality_focal_loss, quality_focal_loss_prob
from distill.outputs import GroundTruth, HeadOutputs, score_logits
from distill.spec import FAMILIES, GFLWeights, LocalJobSpec
from distill.task_criteria import (
    CRITERIA,
    ATSSCriterion,
    FCOSCriterion,
    GFLv2Criterion,
    RetinaCriterion,
    task_criterion,
)
from distill.train import Trainer, run

LN2 = math.log(2)


# ----------------------------------------------------------------------------------------------- max IoU


def test_max_iou_positive_negative_ignored_and_each_boxs_best_anchor():
    anchors = torch.tensor(
        [
            [0.0, 0, 10, 10],  # IoU 1 with box 0: positive
            [0, 0, 10, 22],  # IoU 100/220 = 0.45 with box 0: between 0.4 and 0.5, ignored
            [0, 0, 10, 30],  # IoU 1/3: negative
            [20, 20, 30, 30],  # touches nothing: negative
            [100, 100, 110, 110],  # IoU 100/300 = 1/3 with box 1, its best (a tie): positive anyway
            [100, 120, 110, 130],  # the other anchor of the tie: positive too
            [100, 105, 110, 110],  # IoU 50/300 with box 1: negative
        ]
    )
    boxes = torch.tensor([[[0.0, 0, 10, 10], [100, 100, 110, 130], [0, 0, 0, 0]]])
    valid = torch.tensor([[True, True, False]])
    a = max_iou_assign(anchors, boxes, valid)
    assert a.positive.tolist() == [[True, False, False, False, True, True, False]]
    assert a.gt_index.tolist() == [[0, -1, -1, -1, 1, 1, -1]]
    assert a.ignore.tolist() == [[False, True, False, False, False, False, False]]
    assert a.threshold.tolist() == [[0.5, 0.5, 0.0]]  # alpha_pos of the VLR; padding 0
    assert a.iou[0, 1, 0].item() == pytest.approx(100 / 220)


def test_max_iou_box_touching_no_anchor_takes_none_and_empty_images():
    anchors = torch.tensor([[0.0, 0, 10, 10], [10, 0, 20, 10]])
    a = max_iou_assign(anchors, torch.tensor([[[50.0, 50, 60, 60]]]), torch.tensor([[True]]))
    assert not a.positive.any() and not a.ignore.any()  # mmdetection's min_pos_iou 0 would take both
    none = max_iou_assign(anchors, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool))
    assert none.positive.shape == (2, 2) and not none.positive.any()


def test_max_iou_anchor_best_for_two_boxes_takes_the_one_it_overlaps_most():
    anchors = torch.tensor([[0.0, 0, 10, 10], [40, 40, 50, 50]])
    # Both boxes have anchor 0 as their best (IoU 0.25 and 0.2): it takes the first, which it overlaps more.
    boxes = torch.tensor([[[0.0, 0, 20, 20], [0, 0, 10, 50]]])
    a = max_iou_assign(anchors, boxes, torch.tensor([[True, True]]))
    assert a.positive.tolist() == [[True, False]] and a.gt_index.tolist() == [[0, -1]]


# ----------------------------------------------------------------------------------------------- FCOS


def test_fcos_centre_sampling_regression_ranges_and_smallest_box():
    # Level 0 (stride 8, range [-1, 64]) and level 1 (stride 16, range [64, 128]).
    points = torch.tensor([[16.0, 16], [8, 8], [24, 24], [96, 96], [16, 16], [96, 96]])
    strides = torch.tensor([8.0, 8, 8, 8, 16, 16])
    boxes = torch.tensor([[[0.0, 0, 40, 40], [0, 0, 60, 60], [0, 0, 200, 200]]])
    a = fcos_assign(points, strides, [4, 2], boxes, torch.ones(1, 3, dtype=torch.bool))
    # (16, 16): inside box 0's centre region [8, 32]^2, largest edge distance 24 <= 64; box 1's region is
    #   [18, 42]^2 (centre 30 +- 12): outside; box 2 is far too large for level 0 -> box 0.
    # (8, 8): on the edge of box 0's centre region (distance 0, not > 0) -> negative.
    # (24, 24): inside box 0's (largest distance 24) and box 1's (36) regions: the smaller box 0 wins.
    # (96, 96) at stride 8: box 2's largest distance is 104 > 64 -> negative.
    # (16, 16) at stride 16: box 0's region is the whole box, but 24 is below level 1's range -> negative.
    # (96, 96) at stride 16: box 2's region [76, 124]^2, largest distance 104 in [64, 128] -> box 2.
    assert a.positive.tolist() == [[True, False, True, False, False, True]]
    assert a.gt_index.tolist() == [[0, -1, 0, -1, -1, 2]]


def test_fcos_padding_and_empty_images():
    points, strides = torch.tensor([[16.0, 16]]), torch.tensor([8.0])
    boxes = torch.tensor([[[0.0, 0, 40, 40]], [[0, 0, 0, 0]]])
    a = fcos_assign(points, strides, [1], boxes, torch.tensor([[True], [False]]))
    assert a.positive.tolist() == [[True], [False]]
    none = fcos_assign(points, strides, [1], torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.bool))
    assert not none.positive.any()


def test_fcos_criterion_takes_alpha_pos_from_atss_statistics():
    model = build_detector("fcos_tiny", 2)
    criterion = FCOSCriterion(model, GFLWeights())
    loc = criterion.locations(((12, 16), (6, 8), (3, 4), (2, 2), (1, 1)), torch.device("cpu"))
    gt = GroundTruth(torch.tensor([[[10.0, 12, 70, 80]]]), torch.tensor([[1]]), torch.tensor([[True]]))
    a = criterion.assign(loc, gt)
    atss = atss_assign(loc.anchors, loc.counts, gt.boxes, gt.valid)
    fcos = fcos_assign(loc.points, loc.strides, loc.counts, gt.boxes, gt.valid)
    assert torch.equal(a.positive, fcos.positive) and torch.equal(a.threshold, atss.threshold)
    assert 0 < a.threshold.item() < 1


# ----------------------------------------------------------------------------------------------- losses


def test_focal_loss_by_hand():
    # Class 0 is a negative at p = 0.5: 0.75 * 0.5^2 * ln 2; class 1 the positive at p = sigmoid(2).
    p = 1 / (1 + math.exp(-2))
    expected = 0.75 * 0.25 * LN2 + 0.25 * (1 - p) ** 2 * -math.log(p)
    got = focal_loss(torch.tensor([[0.0, 2.0]]), torch.tensor([1]))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # A negative row (label outside the classes): every class is a negative.
    assert focal_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([2])).item() == pytest.approx(2 * 0.75 * 0.25 * LN2)


def test_centerness_by_hand():
    t = centerness_target(torch.tensor([[1.0, 2, 3, 2], [5, 5, 5, 5], [0, 1, 2, 1]]))
    assert t.tolist() == pytest.approx([math.sqrt(1 / 3), 1.0, 0.0], abs=1e-6)
    # BCE at logit 0 against 0.25: ln 2 whatever the target.
    assert centerness_loss(torch.tensor([0.0]), torch.tensor([0.25])).item() == pytest.approx(LN2)
    assert centerness_loss(torch.tensor([2.0]), torch.tensor([1.0])).item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_qfl_on_probabilities_by_hand_and_equal_to_the_logit_form():
    # Positive class 0 at p = 0.5 towards IoU 0.8: BCE(0.5, 0.8) = ln 2, times |0.8 - 0.5|^2 = 0.09.
    # Class 1 negative at p = 0.2: -ln(0.8) * 0.2^2.
    got = quality_focal_loss_prob(torch.tensor([[0.5, 0.2]]), torch.tensor([0]), torch.tensor([0.8]))
    assert got.item() == pytest.approx(0.09 * LN2 - math.log(0.8) * 0.04, rel=1e-5)
    logits = torch.randn(6, 3)
    labels, quality = torch.tensor([0, 2, 3, 1, 3, 0]), torch.rand(6)
    torch.testing.assert_close(
        quality_focal_loss_prob(logits.sigmoid(), labels, quality), quality_focal_loss(logits, labels, quality)
    )


def _positives(centre: list[float], pred: list[float], target: list[float], reg: torch.Tensor) -> Positives:
    return Positives(
        torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.tensor([centre]),
        reg, torch.tensor([pred]), torch.tensor([target]),
    )  # fmt: skip


def test_focal_family_losses_by_hand():
    # One image, three anchors, one class: anchor 0 positive, anchor 1 negative, anchor 2 ignored (RetinaNet).
    cls = torch.zeros(1, 3, 1)
    reg = torch.zeros(1, 4, 17)  # uniform distributions: every edge decodes to 8
    pos = _positives([10.0, 10.0], [2.0, 2.0, 18.0, 18.0], [4.0, 6.0, 16.0, 14.0], reg)
    ignore = torch.tensor([[False, False, True]])
    giou = 1 - aligned_giou(torch.tensor([2.0, 2, 18, 18]), torch.tensor([4.0, 6, 16, 14])).item()
    # DFL of a uniform distribution over 17 bins: ln 17 for any target (both neighbouring bins cost ln 17).
    retina = focal_losses(cls, pos, torch.tensor([[0]]), GFLWeights(), ignore=ignore)
    assert retina["focal"].item() == pytest.approx(0.25 * 0.25 * LN2 + 0.75 * 0.25 * LN2, rel=1e-5)
    assert retina["giou"].item() == pytest.approx(2.0 * giou, rel=1e-5)
    assert retina["dfl"].item() == pytest.approx(0.25 * math.log(17), rel=1e-5)
    assert set(retina) == {"focal", "giou", "dfl"}
    # With centerness (FCOS, ATSS): the ignored anchor counts as a negative and the quality adds its BCE.
    quality = torch.tensor([[1.0, 0.0, 0.0]])
    fcos = focal_losses(cls, pos, torch.tensor([[0]]), GFLWeights(), quality=quality)
    assert fcos["focal"].item() == pytest.approx(0.25 * 0.25 * LN2 + 2 * 0.75 * 0.25 * LN2, rel=1e-5)
    target = math.sqrt(min(6, 6) / 6 * min(4, 4) / 4)  # l, t, r, b = 6, 4, 6, 4 from the centre (10, 10)
    expected_ctr = -(target * math.log(1 / (1 + math.exp(-1))) + (1 - target) * math.log(1 - 1 / (1 + math.exp(-1))))
    assert fcos["centerness"].item() == pytest.approx(expected_ctr, rel=1e-5)
    assert fcos["giou"].item() == pytest.approx(2.0 * giou, rel=1e-5)  # one positive: its weight cancels


def test_score_logits_is_the_logit_of_class_times_quality():
    cls, quality = torch.randn(2, 5, 3) * 4, torch.randn(2, 5) * 4
    out = HeadOutputs(cls, torch.zeros(2, 5, 4, 17), ((1, 5),), quality=quality)
    torch.testing.assert_close(score_logits(out).sigmoid(), cls.sigmoid() * quality.sigmoid()[..., None])
    assert score_logits(HeadOutputs(cls, out.reg, out.sizes)) is cls


# ----------------------------------------------------------------------------------------------- criteria


def _batch():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 96, 128)
    targets = [
        {"boxes": torch.tensor([[10.0, 10, 60, 70], [70, 20, 120, 90]]), "labels": torch.tensor([0, 1])},
        {"boxes": torch.tensor([[30.0, 30, 90, 80]]), "labels": torch.tensor([1])},
    ]
    return images, targets


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_has_its_criterion_and_terms(family):
    model = build_detector(f"{family}_tiny", 2)
    criterion = task_criterion(model, GFLWeights())
    assert type(criterion) is CRITERIA[family]
    images, targets = _batch()
    losses = criterion(images, targets)
    expected = {
        "gfl": {"qfl", "giou", "dfl"},
        "gflv2": {"qfl", "giou", "dfl"},
        "atss": {"focal", "giou", "dfl", "centerness"},
        "fcos": {"focal", "giou", "dfl", "centerness"},
        "retina": {"focal", "giou", "dfl"},
    }[family]
    assert set(losses) == expected and all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    head = model.bbox_head
    assert head.cls_out.weight.grad.abs().sum() > 0 and head.reg_out.weight.grad.abs().sum() > 0
    if model.has_quality:  # the quality branch is trained (centerness BCE, or QFL through the joint score)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in head.named_parameters()
                   if "centerness" in n or "reg_conf" in n)  # fmt: skip


def test_retina_criterion_assigns_per_anchor_with_max_iou():
    model = build_detector("retina_tiny", 2)
    criterion = RetinaCriterion(model, GFLWeights())
    images, targets = _batch()
    out = criterion.forward(images)
    assert out.cls.shape[1] == 9 * sum(h * w for h, w in out.sizes)
    from distill.outputs import pad_targets

    _, state = criterion.losses(out, pad_targets(targets, "cpu"))
    loc, a = state.locations, state.assignment
    expected = max_iou_assign(loc.anchors, pad_targets(targets, "cpu").boxes, pad_targets(targets, "cpu").valid)
    assert torch.equal(a.positive, expected.positive) and a.positive.any() and a.ignore.any()
    # Positives of one location may be several of its nine anchors; their points are the location's.
    assert torch.equal(loc.points[0::9], loc.points[8::9])


def test_gflv2_qfl_trains_the_joint_score():
    model = build_detector("gflv2_tiny", 2)
    images, targets = _batch()
    criterion = GFLv2Criterion(model, GFLWeights(giou=0, dfl=0))
    out = criterion.forward(images)
    from distill.outputs import pad_targets

    gt = pad_targets(targets, "cpu")
    losses, state = criterion.losses(out, gt)
    # Moving the DGQP logits changes QFL exactly as the joint score says.
    shifted = HeadOutputs(out.cls, out.reg, out.sizes, quality=out.quality + 3.0)
    assert not torch.isclose(criterion.losses(shifted, gt)[0]["qfl"], losses["qfl"])
    prob = out.cls.sigmoid() * out.quality.sigmoid()[..., None]
    pos = state.positives
    from distill.boxes import aligned_iou

    labels = torch.full(prob.shape[:2], 2)
    labels[pos.b, pos.a] = gt.labels[pos.b, pos.gt]
    iou = torch.zeros(prob.shape[:2])
    iou[pos.b, pos.a] = aligned_iou(pos.pred.detach(), pos.target).clamp(min=1e-6)
    by_hand = quality_focal_loss_prob(prob.reshape(-1, 2), labels.reshape(-1), iou.reshape(-1)).sum() / len(pos.b)
    torch.testing.assert_close(losses["qfl"], by_hand)


def test_atss_criterion_is_atss_assignment_with_focal_losses():
    model = build_detector("atss_tiny", 2)
    images, targets = _batch()
    criterion = ATSSCriterion(model, GFLWeights())
    from distill.outputs import pad_targets

    gt = pad_targets(targets, "cpu")
    losses, state = criterion.losses(criterion.forward(images), gt)
    loc = state.locations
    expected = atss_assign(loc.anchors, loc.counts, gt.boxes, gt.valid)
    assert torch.equal(state.assignment.positive, expected.positive)
    assert "focal" in losses and "centerness" in losses


# ----------------------------------------------------------------------------------------------- learning


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_of_each_family_learns_a_few_images(family):
    """60 steps on two fixed images: the loss falls and the detections find the boxes (AP50 rises)."""
    from distill.evaluate import coco_ap

    torch.manual_seed(0)
    model = build_detector(f"{family}_tiny", 2)
    criterion = task_criterion(model, GFLWeights())
    # Two bright squares on a dark image, normalised roughly as the loader does.
    images = torch.full((2, 3, 96, 96), -1.0)
    boxes = [torch.tensor([[16.0, 16, 64, 64]]), torch.tensor([[40.0, 24, 88, 80]])]
    for i, b in enumerate(boxes):
        x1, y1, x2, y2 = (int(v) for v in b[0])
        images[i, i % 3, y1:y2, x1:x2] = 2.0
    targets = [{"boxes": b, "labels": torch.tensor([i])} for i, b in enumerate(boxes)]
    gt = {
        "images": [{"id": i, "width": 96, "height": 96} for i in range(2)],
        "categories": [{"id": 0}, {"id": 1}],
        "annotations": [
            {"id": i + 1, "image_id": i, "category_id": i, "iscrowd": 0,
             "bbox": [*b[0, :2].tolist(), *(b[0, 2:] - b[0, :2]).tolist()], "area": float((b[0, 2:] - b[0, :2]).prod())}
            for i, b in enumerate(boxes)
        ],
    }  # fmt: skip

    def ap50() -> float:
        model.eval()
        dets = []
        for i, r in enumerate(model.predict(images)):
            for box, score, label in zip(r["boxes"], r["scores"], r["labels"], strict=True):
                x1, y1, x2, y2 = box.tolist()
                dets.append({"image_id": i, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1],
                             "score": float(score)})  # fmt: skip
        model.train()
        return coco_ap(gt, dets)["AP50"]

    before = ap50()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    first = last = None
    for step in range(60):
        losses = criterion(images, targets)
        total = sum(losses.values())
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 35)
        opt.step()
        first = float(total.detach()) if step == 0 else first
        last = float(total.detach())
    after = ap50()
    assert last < 0.6 * first, (first, last)
    assert after > max(before, 0) + 0.3, (before, after)


@pytest.mark.parametrize("family", ["gflv2", "atss", "fcos", "retina"])
def test_resume_of_each_family_equals_the_uninterrupted_run(family, tmp_path):
    data = make_synthetic(tmp_path / "data", num_train=4, num_val=0, image_size=(96, 64), seed=2)
    sched = {"epochs": 2, "batch_size": 2, "image_size": [96, 64], "warmup_iters": 1, "num_workers": 0, "lr": 0.01}
    spec = LocalJobSpec.model_validate(
        {"kind": "train", "dataset": str(data), "val_split": 0.0, "student": {"arch": f"{family}_tiny"},
         "schedule": sched, "seed": 4}
    )  # fmt: skip
    run(spec, tmp_path / "straight")
    # The same run stopped after its first epoch's checkpoint, then resumed by a new trainer.
    first = Trainer(spec, tmp_path / "resumed")
    first.total_iters = first.per_epoch
    first.train()
    first.save_checkpoint()
    run(spec, tmp_path / "resumed")
    a = read_checkpoint(tmp_path / "straight" / "model.pt")["state_dict"]
    b = read_checkpoint(tmp_path / "resumed" / "model.pt")["state_dict"]
    assert read_checkpoint(tmp_path / "resumed" / "model.pt")["config"]["family"] == family
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["fcos", "gflv2"])
def test_quality_of_a_pass_that_keeps_tower_features_equals_the_plain_pass(family):
    """CrossKD's student pass keeps tower features (``forward_tower`` gives no quality): the quality computed
    from them is the plain forward's."""
    from distill.outputs import head_outputs

    model = build_detector(f"{family}_tiny", 2).eval()
    images, _ = _batch()
    with torch.no_grad():
        plain = head_outputs(model, images, amp=False)
        for k in (0, 1, 2):
            kept = head_outputs(model, images, amp=False, tower_layer=k)
            torch.testing.assert_close(kept.quality, plain.quality)
            torch.testing.assert_close(kept.cls, plain.cls)
            assert kept.tower is not None

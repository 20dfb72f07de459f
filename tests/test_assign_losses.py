"""ATSS assignment on hand-made cases and against a plain per-box reference; GFL losses by hand."""

import math

import pytest
import torch

from distill.assigners import atss_assign
from distill.boxes import pairwise_iou
from distill.losses.gfl import distribution_focal_loss, giou_loss, quality_focal_loss
from distill.models.gfl import Integral


def test_atss_hand_made_single_box():
    anchors = torch.tensor([[-8.0, -8, 8, 8], [0, -8, 16, 8], [8, -8, 24, 8]])
    gt = torch.tensor([[[2.0, -6, 14, 6]]])
    a = atss_assign(anchors, [3], gt, torch.tensor([[True]]), topk=3)
    assert a.positive.tolist() == [[False, True, False]]
    assert a.gt_index.tolist() == [[-1, 0, -1]]
    ious = torch.tensor([72 / 328, 144 / 256, 72 / 328])
    assert a.threshold[0, 0].item() == pytest.approx((ious.mean() + ious.std()).item(), abs=1e-6)
    assert a.threshold[0, 0].item() == pytest.approx(0.532, abs=1e-3)


def test_atss_padding_and_empty_images():
    anchors = torch.tensor([[-8.0, -8, 8, 8], [0, -8, 16, 8], [8, -8, 24, 8]])
    gt = torch.tensor([[[2.0, -6, 14, 6], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]])
    valid = torch.tensor([[True, False], [False, False]])
    a = atss_assign(anchors, [3], gt, valid, topk=3)
    assert a.positive.tolist() == [[False, True, False], [False, False, False]]
    assert (a.gt_index[1] == -1).all() and (a.threshold[~valid] == 0).all()
    none = atss_assign(anchors, [3], torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.bool))
    assert not none.positive.any()


def _reference_atss(anchors, counts, boxes, topk):
    """mmdetection's algorithm written plainly, one box at a time."""
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    ious = pairwise_iou(anchors, boxes)  # (A, G)
    best = torch.full((len(anchors),), -1.0)
    index = torch.full((len(anchors),), -1)
    for g, box in enumerate(boxes):
        dist = ((centres - (box[:2] + box[2:]) / 2) ** 2).sum(1).sqrt()
        cand, start = [], 0
        for n in counts:
            cand += (dist[start : start + n].topk(min(topk, n), largest=False).indices + start).tolist()
            start += n
        cand_iou = ious[cand, g]
        thr = cand_iou.mean() + cand_iou.std()
        for i in cand:
            inside = (
                min(centres[i, 0] - box[0], centres[i, 1] - box[1], box[2] - centres[i, 0], box[3] - centres[i, 1])
                > 0.01
            )
            if ious[i, g] >= thr and inside and ious[i, g] > best[i]:
                best[i], index[i] = ious[i, g], g
    return index


def test_atss_matches_plain_reference_on_random_scenes():
    from distill.locations import grid_locations, square_anchors

    gen = torch.Generator().manual_seed(0)
    points, strides, counts = grid_locations([(16, 20), (8, 10), (4, 5)], [8, 16, 32])
    anchors = square_anchors(points, strides)
    batch = []
    for _ in range(3):
        xy = torch.rand(5, 2, generator=gen) * 120
        wh = torch.rand(5, 2, generator=gen) * 90 + 8
        batch.append(torch.cat([xy, xy + wh], 1))
    gt = torch.stack(batch)
    a = atss_assign(anchors, counts, gt, torch.ones(3, 5, dtype=torch.bool))
    for i in range(3):
        assert torch.equal(a.gt_index[i], _reference_atss(anchors, counts, gt[i], 9))
    assert a.positive.sum() > 0


def test_integral_is_the_expected_bin():
    integral = Integral(16)
    assert integral(torch.zeros(17)).item() == pytest.approx(8.0)
    peaked = torch.full((17,), -1e4)
    peaked[3] = 0
    assert integral(peaked).item() == pytest.approx(3.0)
    two = torch.full((17,), -1e4)
    two[[2, 3]] = 0
    assert integral(two).item() == pytest.approx(2.5)


def test_distribution_focal_loss_by_hand():
    # Uniform logits: both neighbouring bins cost log(17); weights 0.7 and 0.3 sum to one.
    assert distribution_focal_loss(torch.zeros(1, 17), torch.tensor([1.3])).item() == pytest.approx(math.log(17))
    logits = torch.full((1, 17), -20.0)
    logits[0, 1], logits[0, 2] = math.log(0.7), math.log(0.3)  # exactly the target split: the minimum
    expected = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    assert distribution_focal_loss(logits, torch.tensor([1.3])).item() == pytest.approx(expected, abs=1e-4)


def test_quality_focal_loss_by_hand():
    logits = torch.zeros(2, 1)  # p = 0.5 for both
    loss = quality_focal_loss(logits, torch.tensor([0, 1]), torch.tensor([0.8, 0.0]))
    assert loss[0].item() == pytest.approx(math.log(2) * 0.3**2, abs=1e-6)  # positive, IoU target 0.8
    assert loss[1].item() == pytest.approx(math.log(2) * 0.5**2, abs=1e-6)  # negative


def test_giou_loss_by_hand():
    loss = giou_loss(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 1, 3, 3]]))
    assert loss.item() == pytest.approx(1 - (1 / 7 - 2 / 9), abs=1e-6)
    assert giou_loss(torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[0.0, 0, 2, 2]])).item() == pytest.approx(0)

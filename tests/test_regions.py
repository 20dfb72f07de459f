"""Main region and VLR on hand-made boxes, against a plain per-location reference, and on real ATSS output."""

import pytest
import torch

from distill.assigners import atss_assign
from distill.boxes import pairwise_diou
from distill.locations import grid_locations, square_anchors
from distill.regions import find_regions

GT = torch.tensor([[[0.0, 0, 40, 40]]])
# Hand-computed against GT: IoU, centre distance^2 rho2, enclosing diagonal^2 c2 -> DIoU = IoU - rho2 / c2.
ANCHORS = torch.tensor(
    [
        [10.0, 10, 30, 30],  # IoU 400/1600, same centre            -> DIoU 0.25
        [30.0, 0, 50, 20],  # IoU 200/1800, rho2 500, c2 4100       -> DIoU 1/9 - 5/41
        [20.0, 20, 60, 60],  # IoU 400/2800, rho2 800, c2 7200      -> DIoU 1/7 - 1/9
        [0.0, 0, 40, 40],  # the box itself                         -> DIoU 1
        [100.0, 100, 120, 120],  # IoU 0, rho2 16200, c2 28800      -> DIoU -0.5625
    ]
)
DIOU = [0.25, 1 / 9 - 5 / 41, 1 / 7 - 1 / 9, 1.0, -0.5625]
IOU = [0.25, 1 / 9, 1 / 7, 1.0, 0.0]


def _regions(anchors, gt, positive=None, alpha=0.3, gamma=0.25, valid=None):
    b, g = gt.shape[:2]
    positive = torch.zeros(b, len(anchors), dtype=torch.bool) if positive is None else positive
    valid = torch.ones(b, g, dtype=torch.bool) if valid is None else valid
    alpha_pos = torch.full((b, g), alpha) if not torch.is_tensor(alpha) else alpha
    return find_regions(anchors, gt, valid, positive, alpha_pos, gamma)


def test_diou_matches_hand_computation():
    torch.testing.assert_close(pairwise_diou(ANCHORS, GT[0])[:, 0], torch.tensor(DIOU))


def test_vlr_on_hand_made_boxes():
    # alpha 0.3, gamma 0.25: DIoU in [0.075, 0.3] -> only anchor 0 (anchor 3 is above alpha_pos).
    r = _regions(ANCHORS, GT)
    assert r.vlr.tolist() == [[True, False, False, False, False]]
    assert r.vlr_gt.tolist() == [[0, -1, -1, -1, -1]]
    torch.testing.assert_close(r.vlr_weight, torch.tensor([[0.25, 0, 0, 0, 0]]))  # IoU, not DIoU
    # gamma 0.1: [0.03, 0.3] also takes anchor 2 (DIoU 0.0317), weighted by its IoU 1/7.
    r = _regions(ANCHORS, GT, gamma=0.1)
    assert r.vlr.tolist() == [[True, False, True, False, False]]
    torch.testing.assert_close(r.vlr_weight, torch.tensor([[0.25, 0, 1 / 7, 0, 0]]))


def test_gamma_one_empties_the_vlr_and_gamma_zero_takes_every_nonnegative_diou_up_to_alpha():
    assert not _regions(ANCHORS, GT, gamma=1.0).vlr.any()
    r = _regions(ANCHORS, GT, gamma=0.0)
    expected = [0 <= d <= 0.3 for d in DIOU]
    assert r.vlr[0].tolist() == expected == [True, False, True, False, False]


def test_positives_are_never_in_the_vlr():
    positive = torch.tensor([[True, False, False, True, False]])
    r = _regions(ANCHORS, GT, positive=positive, gamma=0.0)
    assert r.vlr.tolist() == [[False, False, True, False, False]]
    assert torch.equal(r.main, positive)
    assert r.vlr_weight[0, 0] == 0 and r.vlr_gt[0, 0] == -1


def test_best_diou_ground_truth_wins_among_those_that_qualify():
    anchor = torch.tensor([[10.0, 10, 30, 30]])
    near = [0.0, 0, 40, 40]  # DIoU 0.25
    shifted = [5.0, 5, 45, 45]  # IoU 0.25, rho2 50, c2 3200 -> DIoU 0.234375
    for order, winner in (([near, shifted], 0), ([shifted, near], 1)):
        r = _regions(anchor, torch.tensor([order]))
        assert r.vlr_gt.tolist() == [[winner]]
    # A ground truth the anchor overlaps too well (DIoU above its alpha_pos) does not qualify; the
    # anchor belongs to the VLR of the other one.
    same = [10.0, 10, 30, 30]  # DIoU 1 > alpha
    r = _regions(anchor, torch.tensor([[same, shifted]]))
    assert r.vlr_gt.tolist() == [[1]]
    torch.testing.assert_close(r.vlr_weight, torch.tensor([[0.25]]))


def test_padding_and_images_without_objects():
    gt = torch.tensor([[[0.0, 0, 40, 40], [0, 0, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]])
    valid = torch.tensor([[True, False], [False, False]])
    r = _regions(ANCHORS, gt, valid=valid, gamma=0.0, alpha=torch.tensor([[0.3, 0.0], [0.0, 0.0]]))
    assert r.vlr[0].tolist() == [True, False, True, False, False]
    assert not r.vlr[1].any()
    empty = find_regions(
        ANCHORS,
        torch.zeros(2, 0, 4),
        torch.zeros(2, 0, dtype=torch.bool),
        torch.zeros(2, 5, dtype=torch.bool),
        torch.zeros(2, 0),
        0.25,
    )
    assert empty.vlr.shape == (2, 5) and not empty.vlr.any() and (empty.vlr_gt == -1).all()


def _reference_regions(anchors, gt, valid, positive, alpha, gamma):
    """Algorithm 1 written plainly: one location and one ground truth at a time, in float64."""
    b, a = positive.shape
    vlr = torch.zeros(b, a, dtype=torch.bool)
    weight = torch.zeros(b, a, dtype=torch.float64)
    match = torch.full((b, a), -1)
    for i in range(b):
        for j in range(a):
            if positive[i, j]:
                continue
            x1, y1, x2, y2 = anchors[j].double().tolist()
            best = None
            for k in range(gt.shape[1]):
                if not valid[i, k]:
                    continue
                g1, h1, g2, h2 = gt[i, k].double().tolist()
                inter = max(0.0, min(x2, g2) - max(x1, g1)) * max(0.0, min(y2, h2) - max(y1, h1))
                union = (x2 - x1) * (y2 - y1) + (g2 - g1) * (h2 - h1) - inter
                iou = inter / union
                rho2 = ((x1 + x2) / 2 - (g1 + g2) / 2) ** 2 + ((y1 + y2) / 2 - (h1 + h2) / 2) ** 2
                c2 = (max(x2, g2) - min(x1, g1)) ** 2 + (max(y2, h2) - min(y1, h1)) ** 2
                d = iou - rho2 / c2
                al = float(alpha[i, k])
                if gamma * al <= d <= al and (best is None or d > best[0]):
                    best = (d, k, iou)
            if best is not None:
                vlr[i, j], match[i, j], weight[i, j] = True, best[1], best[2]
    return vlr, weight, match


def _random_batch(seed, b=2, g=4, size=(96, 128)):
    gen = torch.Generator().manual_seed(seed)
    h, w = size
    xy = torch.rand(b, g, 2, generator=gen) * torch.tensor([w * 0.8, h * 0.8])
    wh = 8 + torch.rand(b, g, 2, generator=gen) * 56
    gt = torch.cat([xy, (xy + wh).minimum(torch.tensor([float(w), float(h)]))], -1)
    valid = torch.ones(b, g, dtype=torch.bool)
    valid[1, -1] = False
    feature_sizes = [(-(-h // s), -(-w // s)) for s in (8, 16, 32, 64, 128)]
    points, strides, counts = grid_locations(feature_sizes, [8, 16, 32, 64, 128])
    return points, strides, counts, gt, valid


@pytest.mark.parametrize("gamma", [0.0, 0.25, 0.6])
def test_matches_plain_reference_on_real_atss_assignment(gamma):
    points, strides, counts, gt, valid = _random_batch(seed=int(gamma * 100))
    anchors = square_anchors(points, strides)
    a = atss_assign(anchors, counts, gt, valid)
    r = find_regions(anchors, gt, valid, a.positive, a.threshold, gamma)
    vlr, weight, match = _reference_regions(anchors, gt, valid, a.positive, a.threshold, gamma)
    assert vlr.any() and a.positive.any()
    assert torch.equal(r.vlr, vlr)
    assert torch.equal(r.vlr_gt, match)
    torch.testing.assert_close(r.vlr_weight.double(), weight, rtol=1e-5, atol=1e-6)
    assert not (r.vlr & a.positive).any()
    assert torch.equal(r.main, a.positive)


def test_gamma_one_is_empty_on_real_assignment():
    points, strides, counts, gt, valid = _random_batch(seed=7)
    anchors = square_anchors(points, strides)
    a = atss_assign(anchors, counts, gt, valid)
    assert not find_regions(anchors, gt, valid, a.positive, a.threshold, 1.0).vlr.any()


def test_anchor_free_locations_give_the_same_regions_as_an_anchor_based_head():
    """GFL/FCOS regress from points; their preset anchor (side 8 x stride around the point) exists only to
    find the regions. An anchor-based head whose anchor generator lays the same base anchor over the grid
    (mmdetection's way: base anchor at the origin + per-cell shifts) gets identical regions."""
    points, strides, counts, gt, valid = _random_batch(seed=11)
    anchor_free = square_anchors(points, strides)
    per_level, start = [], 0
    for s, n in zip((8, 16, 32, 64, 128), counts, strict=True):
        base = torch.tensor([-4.0 * s, -4.0 * s, 4.0 * s, 4.0 * s])
        shifts = points[start : start + n].repeat(1, 2)
        per_level.append(base + shifts)
        start += n
    anchor_based = torch.cat(per_level)
    a = atss_assign(anchor_based, counts, gt, valid)
    r_free = find_regions(anchor_free, gt, valid, a.positive, a.threshold, 0.25)
    r_based = find_regions(anchor_based, gt, valid, a.positive, a.threshold, 0.25)
    for field in ("main", "vlr", "vlr_weight", "vlr_gt"):
        assert torch.equal(getattr(r_free, field), getattr(r_based, field)), field
    assert r_free.vlr.any()

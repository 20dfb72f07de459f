"""The paper's figure 5 per job: the student's box-logit error to the teacher per location at P5 and P6."""

from __future__ import annotations

import torch

from distill.checkpoint import build_detector
from distill.logit_maps import figure5, logit_error_maps


def test_maps_are_zero_for_the_teacher_itself_and_positive_for_another_model():
    torch.manual_seed(0)
    teacher = build_detector("gfl_tiny", 2)
    same = build_detector("gfl_tiny", 2)
    same.load_state_dict(teacher.state_dict())
    images = torch.randn(1, 3, 128, 192)
    p5, p6 = logit_error_maps(same, teacher, images)
    assert p5.shape == (4, 6) and p6.shape == (2, 3)
    assert p5.abs().max() < 1e-5 and p6.abs().max() < 1e-5
    other = build_detector("gfl_tiny", 2)
    with torch.no_grad():
        for p in other.bbox_head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    p5, _ = logit_error_maps(other, teacher, images)
    assert (p5 > 0).all()


def test_maps_across_families_and_anchor_counts():
    torch.manual_seed(1)
    images = torch.randn(1, 3, 128, 128)
    for student, teacher in (("retina_tiny", "fcos_tiny"), ("fcos_tiny", "retina_tiny")):
        p5, p6 = logit_error_maps(build_detector(student, 3), build_detector(teacher, 3), images)
        assert p5.shape == (4, 4) and p6.shape == (2, 2) and torch.isfinite(p5).all()


def test_figure5_takes_the_first_validation_image_unpadded():
    torch.manual_seed(2)
    images = torch.randn(2, 3, 128, 192)
    targets = [{"image_id": 7, "size": (100, 150), "scale": 0.5}, {"image_id": 8, "size": (128, 192), "scale": 1.0}]
    model, teacher = build_detector("gfl_tiny", 2), build_detector("gfl_tiny", 2)
    fig = figure5(model, teacher, [(images, targets)], "cpu")
    # 100 x 150 rounds up to 128 x 160: P5 is 4 x 5, P6 2 x 3.
    assert fig["image_id"] == 7 and fig["size"] == [100, 150] and fig["strides"] == [32, 64]
    assert [len(fig["maps"][0]), len(fig["maps"][0][0])] == [4, 5] and [
        len(fig["maps"][1]),
        len(fig["maps"][1][0]),
    ] == [2, 3]


def test_error_maps_are_drawn_over_the_image_with_one_scale_per_column():
    from PIL import Image

    from deploy.draw import draw_error_maps

    photo = Image.new("RGB", (150, 100), (128, 128, 128))
    hot = [[0.0] * 5 for _ in range(4)]
    hot[0][0] = 2.0  # one bright cell at the top left of P5, after distillation only
    fig = {"size": [100, 150], "strides": [32, 64], "maps": [hot, [[0.0] * 3 for _ in range(2)]], "image_id": 1}
    cold = {**fig, "maps": [[[1.0] * 5 for _ in range(4)], [[0.0] * 3 for _ in range(2)]]}
    out = draw_error_maps(photo, {"before": cold, "after": fig}, panel=150)
    # Two columns of 150 x 100 panels beside the row labels, two rows under the titles.
    assert out.size == (70 + 2 * 158, 22 + 2 * 108 + 4)
    bright = out.getpixel((70 + 5, 22 + 108 + 5))  # after, P5, the hot cell
    dark = out.getpixel((70 + 140, 22 + 108 + 90))  # after, P5, a cold cell
    mid = out.getpixel((70 + 140, 22 + 5))  # before, P5, error 1.0 on the same scale (max 2.0)
    assert sum(bright) > sum(mid) > sum(dark)

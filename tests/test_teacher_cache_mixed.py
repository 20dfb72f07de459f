"""The teacher cache on mixed-size photos (issue 21): its key is (image, flip) alone, so over a run the teacher
passes equal the distinct (image, flip) pairs however the shuffles batch them; a cached answer equals the
teacher on the image alone (its own canvas), and every term reads only the images' own locations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from distill.class_map import map_classes
from distill.criterion import DistillCriterion
from distill.data.annotations import write_coco
from distill.data.dataset import build_loaders, set_epoch
from distill.models.gfl import GFL, DetectorConfig
from distill.outputs import head_outputs, pad_targets, valid_locations
from distill.spec import DistillSpec, GFLWeights
from distill.task_criteria import task_criterion
from distill.teacher_cache import TeacherCache


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    """12 photos of 4 shapes, landscape and portrait, one box each."""
    root = tmp_path_factory.mktemp("mixed")
    shapes = [(160, 120), (200, 100), (90, 150), (120, 200)]
    images, anns = [], []
    for i in range(12):
        w, h = shapes[i % 4]
        Image.new("RGB", (w, h), (40 + 15 * i, 90, 160 - 10 * i)).save(root / f"{i}.jpg")
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": w, "height": h})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1 + i % 2, "bbox": [w / 4, h / 4, w / 2, h / 3]})
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    write_coco({"images": images, "annotations": anns, "categories": cats}, root / "annotations.json")
    return root


def _criterion(student: GFL, teacher: GFL, spec: DistillSpec) -> DistillCriterion:
    return DistillCriterion(task_criterion(student, GFLWeights()), teacher, spec, map_classes(["a", "b"], ["a", "b"]))


def _tiny(seed: int) -> GFL:
    torch.manual_seed(seed)
    return GFL(DetectorConfig(depth=18, base_width=16, channels=32, stacked_convs=2, num_classes=2, classes=["a", "b"]))


@pytest.mark.parametrize("weights", [{}, {"bckd_cls": 1.0, "bckd_loc": 1.0}])  # LD's default (sparse); dense
@torch.no_grad()
def test_teacher_passes_are_the_distinct_image_flip_pairs_and_terms_read_only_the_images(mixed, tmp_path, weights):
    train, _, _ = build_loaders(mixed, 0.0, 0, (128, 96), 3, 0)
    student, teacher = _tiny(0), _tiny(1)
    spec = DistillSpec.model_validate({"weights": weights})
    criterion = _criterion(student, teacher, spec)
    # NaN where the cache holds nothing: a term that read the padding beyond an image's own canvas would be NaN.
    cache = TeacherCache(tmp_path / "cache", criterion, fill=float("nan"))
    criterion.teacher_source = cache
    canvases = set()
    for epoch in range(4):
        set_epoch(train, epoch)
        for images, targets in train:
            canvases.add(tuple(images.shape[-2:]))
            losses = criterion(images, targets)
            assert all(torch.isfinite(v) for v in losses.values()), losses
    report = cache.report()
    assert len(canvases) > 1  # the batches really had several canvases
    assert report["images"] <= 24 and report["teacher_passes"] == report["images"] == report["entries"], report
    assert report["teacher_passes"] <= 1.05 * report["images"]
    # 4 epochs over 12 photos: every lookup past each pair's first is a hit.
    assert report["lookups"] == 48 and report["hit_rate"] == pytest.approx(1 - report["teacher_passes"] / 48, abs=1e-4)


@torch.no_grad()
def test_a_padded_batch_gets_each_images_own_answer(mixed, tmp_path):
    train, _, _ = build_loaders(mixed, 0.0, 0, (128, 96), 4, 0)
    set_epoch(train, 0)
    student, teacher = _tiny(0), _tiny(1)
    spec = DistillSpec.model_validate({"weights": {"bckd_cls": 1.0}})  # dense: every location of the image
    criterion = _criterion(student, teacher, spec)
    cache = TeacherCache(tmp_path / "cache", criterion)
    images, targets = next(iter(train))
    for attempt in ("miss", "hit"):
        out = cache(images, targets)
        loc = criterion.task.locations(out.sizes, images.device)
        valid = valid_locations(loc.points, pad_targets(targets, images.device), images.shape[0])
        for i, t in enumerate(targets):
            h, w = (-(-int(v) // 32) * 32 for v in t["size"])
            alone = criterion.to_student(head_outputs(teacher, images[i : i + 1, :, :h, :w], amp=False))
            # The image's valid locations, in the batch's rows and in its own canvas's rows, in the same order.
            own_loc = criterion.task.locations(alone.sizes, images.device)
            own_valid = valid_locations(own_loc.points, pad_targets([t], images.device), 1)[0]
            torch.testing.assert_close(out.reg[i][valid[i]], alone.reg[0][own_valid], rtol=1e-3, atol=2e-3, msg=attempt)
            torch.testing.assert_close(out.cls[i][valid[i]], alone.cls[0][own_valid], rtol=1e-3, atol=2e-3, msg=attempt)

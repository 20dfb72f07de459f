"""Transforms, the Dataset, batching and the loaders' reproducibility."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.data.annotations import load_coco, write_coco
from distill.data.dataset import (
    DetectionDataset,
    build_loaders,
    collate,
    hflip,
    normalize,
    resize,
    set_epoch,
)
from distill.data.images import MEAN, STD, rescale_size
from distill.data.sampler import EpochSampler


@pytest.mark.parametrize(
    ("size", "limits", "expected"),
    [
        ((1000, 500), (1333, 800), (1333, 667)),  # the long side binds
        ((500, 1000), (1333, 800), (667, 1333)),  # same for portrait
        ((640, 480), (1333, 800), (1067, 800)),  # the short side binds
        ((640, 480), (800, 1333), (1067, 800)),  # the limits in either order
        ((2000, 2000), (512, 320), (320, 320)),
    ],
)
def test_rescale_size_examples(size: tuple[int, int], limits: tuple[int, int], expected: tuple[int, int]) -> None:
    assert rescale_size(*size, limits)[:2] == expected


def test_rescale_size_keeps_ratio_and_limits() -> None:
    rng = random.Random(0)
    for _ in range(500):
        w, h = rng.randint(20, 3000), rng.randint(20, 3000)
        long_max, short_max = rng.randint(100, 1400), rng.randint(64, 900)
        long_max, short_max = max(long_max, short_max), min(long_max, short_max)
        nw, nh, scale = rescale_size(w, h, (long_max, short_max))
        assert max(nw, nh) <= long_max and min(nw, nh) <= short_max
        assert max(nw, nh) == long_max or min(nw, nh) == short_max  # as large as allowed
        assert abs(nw - w * scale) <= 0.5 and abs(nh - h * scale) <= 0.5


def test_resize_moves_boxes_with_the_pixels() -> None:
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 255, 255), (40, 20, 120, 60))
    boxes = torch.tensor([[40.0, 20.0, 120.0, 60.0]])
    out, out_boxes, scale = resize(image, boxes, (100, 100))
    assert out.size == (100, 50) and scale == 0.5
    assert out_boxes.tolist() == [[20.0, 10.0, 60.0, 30.0]]
    pixels = np.asarray(out)
    assert pixels[12:28, 22:58].min() > 250 and pixels[:8].max() < 5 and pixels[:, 62:].max() < 5


def test_normalize_uses_mmdetection_mean_and_std() -> None:
    image = Image.new("RGB", (3, 2), tuple(round(m) for m in MEAN))
    image.putpixel((0, 0), (255, 0, 0))
    x = normalize(image)
    assert x.shape == (3, 2, 3) and x.dtype == torch.float32
    assert torch.allclose(x[:, 1, 1], torch.tensor([(round(m) - m) / s for m, s in zip(MEAN, STD, strict=True)]))
    assert torch.allclose(x[:, 0, 0], torch.tensor([(255 - MEAN[0]) / STD[0], -MEAN[1] / STD[1], -MEAN[2] / STD[2]]))


def test_hflip_mirrors_image_and_boxes() -> None:
    image = torch.zeros(3, 10, 100)
    image[:, 2:5, 10:30] = 1.0
    boxes = torch.tensor([[10.0, 2.0, 30.0, 5.0], [0.0, 0.0, 100.0, 10.0]])
    flipped, fboxes = hflip(image, boxes)
    assert fboxes.tolist() == [[70.0, 2.0, 90.0, 5.0], [0.0, 0.0, 100.0, 10.0]]
    x1, y1, x2, y2 = (int(v) for v in fboxes[0])
    assert flipped[:, y1:y2, x1:x2].min() == 1.0 and flipped.sum() == image.sum()
    back, bboxes = hflip(flipped, fboxes)
    assert torch.equal(back, image) and torch.equal(bboxes, boxes)


def test_collate_pads_to_multiples_of_32() -> None:
    a, b = torch.randn(3, 50, 70), torch.randn(3, 64, 33)
    images, targets = collate([(a, {"n": 0}), (b, {"n": 1})])
    assert images.shape == (2, 3, 64, 96)
    assert torch.equal(images[0, :, :50, :70], a) and torch.equal(images[1, :, :64, :33], b)
    assert images[0, :, 50:].abs().sum() == 0 and images[0, :, :, 70:].abs().sum() == 0
    assert images[1, :, :, 33:].abs().sum() == 0
    assert [t["n"] for t in targets] == [0, 1]
    assert collate([(torch.zeros(3, 32, 33), {})])[0].shape == (1, 3, 32, 64)


def _dataset(root: Path, n: int = 6) -> Path:
    images, annotations = [], []
    for i in range(n):
        w, h = 60 + 10 * i, 40 + 5 * i
        image = Image.new("RGB", (w, h), (30, 30, 30))
        image.paste((250, 250, 250), (5, 6, 25, 30))
        image.save(root / f"{i}.png")
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        annotations.append({"id": 2 * i + 1, "image_id": i + 1, "category_id": 7, "bbox": [5, 6, 20, 24]})
        annotations.append(
            {"id": 2 * i + 2, "image_id": i + 1, "category_id": 9, "bbox": [30, 10, 10, 10], "iscrowd": 1}
        )
    write_coco(
        {"images": images, "annotations": annotations, "categories": [{"id": 7, "name": "a"}, {"id": 9, "name": "b"}]},
        root,
    )
    return root


def test_dataset_item(tmp_path: Path) -> None:
    data = load_coco(_dataset(tmp_path))
    ds = DetectionDataset(data, [3], image_size=(160, 100))
    image, target = ds[0]
    # image 3 (index 2) is 80x50 -> scale min(160/80, 100/50) = 2 -> 160x100
    assert image.shape == (3, 100, 160)
    assert target["boxes"].tolist() == [[10.0, 12.0, 50.0, 60.0]]  # iscrowd box left out
    assert target["labels"].tolist() == [0] and target["labels"].dtype == torch.int64
    assert target["image_id"] == 3 and target["orig_size"] == (50, 80) and target["size"] == (100, 160)
    assert target["scale"] == 2.0 and target["scale_xy"] == (2.0, 2.0)
    x1, y1, x2, y2 = (int(v) for v in target["boxes"][0])
    white = (250 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert torch.allclose(image[:, y1 + 2 : y2 - 2, x1 + 2 : x2 - 2].amin((1, 2)), white, atol=1e-4)


def test_training_flips_are_seeded_by_epoch(tmp_path: Path) -> None:
    data = load_coco(_dataset(tmp_path, n=6))
    ds = DetectionDataset(data, data.image_ids * 4, image_size=(160, 100), train=True, seed=5)

    def flips(epoch: int) -> list[bool]:
        ds.set_epoch(epoch)
        return [ds[i][1]["boxes"][0, 0].item() > 40 for i in range(6)]

    per_epoch = [flips(e) for e in range(8)]
    assert per_epoch[3] == flips(3)  # same (seed, epoch) -> same flips
    assert len({tuple(f) for f in per_epoch}) > 1  # epochs differ
    share = sum(map(sum, per_epoch)) / 48
    assert 0.25 < share < 0.75
    ds.train = False
    assert not any(flips(1))


def test_epoch_sampler_resumes_mid_epoch() -> None:
    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    assert sorted(full) == list(range(10)) and full != list(range(10))
    sampler.set_epoch(2, start=4)
    assert list(sampler) == full[4:] and len(sampler) == 6
    sampler.set_epoch(3)
    assert list(sampler) != full


def _batches(loader) -> list[tuple[list[int], torch.Tensor]]:
    return [([t["image_id"] for t in targets], images) for images, targets in loader]


def test_loaders_are_reproducible_and_resume(tmp_path: Path) -> None:
    root = _dataset(tmp_path, n=10)
    train, val, data = build_loaders(root, 0.2, seed=1, image_size=(128, 96), batch_size=2, num_workers=0)
    assert (len(train.dataset), len(val.dataset), data.classes) == (8, 2, ["a", "b"])
    set_epoch(train, 1)
    epoch1 = _batches(train)
    assert len(epoch1) == 4 and sorted(i for ids, _ in epoch1 for i in ids) == sorted(train.dataset.image_ids)
    assert all(images.shape[-2] % 32 == 0 and images.shape[-1] % 32 == 0 for _, images in epoch1)

    set_epoch(train, 1, start_iter=2)
    resumed = _batches(train)
    assert [ids for ids, _ in resumed] == [ids for ids, _ in epoch1[2:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, epoch1[2:], strict=True))

    train2, _, _ = build_loaders(root, 0.2, seed=1, image_size=(128, 96), batch_size=2, num_workers=2)
    set_epoch(train2, 1)
    with_workers = _batches(train2)
    assert [ids for ids, _ in with_workers] == [ids for ids, _ in epoch1]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(with_workers, epoch1, strict=True))
    set_epoch(train2, 2)
    assert [ids for ids, _ in _batches(train2)] != [ids for ids, _ in epoch1]
    assert [t["image_id"] for _, ts in val for t in ts] == val.dataset.image_ids

"""Batches grouped by aspect ratio (issue 21): one group per batch, every image once per epoch, the same order
when resumed mid-epoch, disjoint shards under DDP, and exactly the ungrouped batches on single-group data."""

from __future__ import annotations

import torch

from distill.data.sampler import EpochSampler, GroupedBatchSampler, aspect_groups

# 23 images: 15 landscape, 8 portrait, interleaved.
GROUPS = [1 if i % 3 == 0 else 0 for i in range(23)][:-1] + [1]


def _batches(sampler: GroupedBatchSampler, epoch: int = 0, start: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch, start)
    return list(sampler)


def test_aspect_groups():
    assert aspect_groups([(640, 480), (480, 640), (500, 500)]) == [0, 1, 0]


def test_every_batch_is_one_group_and_every_image_comes_once():
    sampler = GroupedBatchSampler(GROUPS, 4, seed=3)
    batches = _batches(sampler, epoch=1)
    assert all(len({GROUPS[i] for i in b}) == 1 for b in batches)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(GROUPS)))
    assert sum(len(b) < 4 for b in batches) <= 2  # at most one short batch per group
    assert len(sampler) == len(batches)
    assert _batches(sampler, epoch=1) == batches and _batches(sampler, epoch=2) != batches


def test_resume_mid_epoch_continues_the_same_order():
    sampler = GroupedBatchSampler(GROUPS, 4, seed=3)
    whole = _batches(sampler, epoch=2)
    assert _batches(GroupedBatchSampler(GROUPS, 4, seed=3), epoch=2, start=3) == whole[3:]
    sampler.set_epoch(2, 3)
    assert len(sampler) == len(whole) - 3


def test_shards_are_disjoint_and_together_the_single_process_batches():
    one = _batches(GroupedBatchSampler(GROUPS, 4, seed=5))
    ranks = [_batches(GroupedBatchSampler(GROUPS, 2, seed=5, rank=r, world=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)  # every rank takes the same number of steps
    for step, global_batch in enumerate(one):
        a, b = ranks[0][step], ranks[1][step]
        assert sorted(a + b) == sorted(global_batch) or (len(global_batch) == 1 and a == b == global_batch)
        assert not set(a) & set(b) or len(global_batch) == 1


def test_single_group_data_gets_exactly_the_ungrouped_batches():
    n, batch = 22, 4
    grouped = _batches(GroupedBatchSampler([0] * n, batch, seed=7), epoch=4)
    plain = EpochSampler(n, seed=7, batch_size=batch)
    plain.set_epoch(4)
    order = list(plain)
    assert grouped == [order[i : i + batch] for i in range(0, n, batch)]


def test_the_loader_batches_one_aspect_group(tmp_path):
    from PIL import Image

    from distill.data.annotations import write_coco
    from distill.data.dataset import build_loaders, set_epoch

    images, anns = [], []
    for i in range(10):
        size = (64, 48) if i % 2 else (48, 64)
        Image.new("RGB", size, (i * 20, 90, 120)).save(tmp_path / f"{i}.jpg")
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": size[0], "height": size[1]})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [4, 4, 20, 20]})
    write_coco({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]},
               tmp_path / "annotations.json")  # fmt: skip
    train, _, _ = build_loaders(tmp_path, 0.2, 0, (64, 64), 2, 0)
    set_epoch(train, 0)
    seen = 0
    for batch_images, targets in train:
        shapes = {tuple(t["orig_size"]) for t in targets}
        assert len(shapes) == 1, shapes  # portrait and landscape never share a padded canvas
        assert batch_images.shape[0] == len(targets)
        seen += len(targets)
    assert seen == len(train.dataset)
    assert torch.is_tensor(batch_images)

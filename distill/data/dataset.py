"""The torch side of the data: a detection Dataset over a ``CocoData``, its transforms, batching, loaders.

Preprocessing is mmdetection's GFL pipeline: EXIF-oriented RGB, keep-ratio resize, random horizontal flip
(training), normalise with ``MEAN``/``STD``, zero-pad to a multiple of 32. The resize and normalisation are
the torch-free functions of ``annotations`` that the ONNX runtime also uses, so serving sees the same pixels.

Randomness depends only on ``(seed, epoch)``: the sampler's order and each image's flip are drawn from
torch generators seeded with them, so the batches do not change with the number of workers, and a run
resumed mid-epoch (``set_epoch(loader, epoch, start_iter)``) sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from distill.data.annotations import (
    MEAN,
    STD,
    CocoData,
    DatasetError,
    load_coco,
    normalize_image,
    read_image,
    rescale_size,
    resize_image,
    split,
)

__all__ = ["MEAN", "STD", "DetectionDataset", "EpochSampler", "build_loaders", "collate", "hflip", "normalize",
           "resize", "set_epoch"]

Target = dict[str, Any]
_MIX = 1_000_003  # combines (seed, epoch, image id) into one generator seed


def _generator(*keys: int) -> torch.Generator:
    seed = 0
    for k in keys:
        seed = (seed * _MIX + k) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- transforms


def resize(image: Image.Image, boxes: Tensor, image_size: tuple[int, int]) -> tuple[Image.Image, Tensor, float]:
    """Keep-ratio resize to fit ``image_size = (long_max, short_max)`` (mmdetection's rule, see
    ``rescale_size``); ``boxes (K, 4)`` x1y1x2y2 follow with the exact per-axis factors. Returns the image,
    the boxes and the nominal scale (resized / original)."""
    scale = rescale_size(image.width, image.height, image_size)[2]
    image, (sx, sy) = resize_image(image, image_size)
    return image, boxes * boxes.new_tensor([sx, sy, sx, sy]), scale


def normalize(image: Image.Image) -> Tensor:
    """RGB image -> ``(3, H, W)`` float tensor ``(pixel - MEAN) / STD`` on the 0-255 scale."""
    return torch.from_numpy(normalize_image(image))


def hflip(image: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Mirror ``image (3, H, W)`` and its ``boxes (K, 4)`` x1y1x2y2 left-right: ``x -> W - x``."""
    width = image.shape[-1]
    return image.flip(-1), torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)


# ------------------------------------------------------------------------------------------------- dataset


class DetectionDataset(Dataset[tuple[Tensor, Target]]):
    """Images ``image_ids`` of ``data``. Item ``i`` is ``(image, target)``:

    - ``image``: ``(3, H, W)`` float32, normalised, resized (not padded);
    - ``target``: ``boxes (K, 4)`` float32 x1y1x2y2 in resized pixels (iscrowd boxes left out),
      ``labels (K,)`` int64 in ``0..C-1``, ``image_id`` int, ``orig_size (h, w)`` and ``size (h, w)`` ints
      (original and resized), ``scale`` float (nominal resized / original) and ``scale_xy (sx, sy)``, the
      exact per-axis factors: divide predicted x by ``sx`` and y by ``sy`` to get original pixels.

    With ``train=True`` each image is flipped with probability ``flip_prob``, decided by
    ``(seed, epoch, image id)`` (``set_epoch`` before each epoch).
    """

    def __init__(
        self,
        data: CocoData,
        image_ids: Sequence[int],
        *,
        image_size: tuple[int, int] = (1333, 800),
        train: bool = False,
        flip_prob: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.data = data
        self.image_ids = list(image_ids)
        self.image_size = image_size
        self.train = train
        self.flip_prob = flip_prob
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> tuple[Tensor, Target]:
        image_id = self.image_ids[i]
        info = self.data.image(image_id)
        image = read_image(info["path"])
        boxes, labels = self.data.boxes(image_id)
        if image.size != (info["width"], info["height"]):  # only when loaded with check_images=False
            raise DatasetError(f"{info['file_name']}: image is {image.width}x{image.height}, "
                               f"annotations say {info['width']}x{info['height']}")
        orig_size = (image.height, image.width)
        image, box_t, scale = resize(image, torch.from_numpy(boxes), self.image_size)
        tensor = normalize(image)
        if self.train and self.flip_prob > 0:
            u = torch.rand((), generator=_generator(self.seed, self.epoch, image_id)).item()
            if u < self.flip_prob:
                tensor, box_t = hflip(tensor, box_t)
        target = {
            "boxes": box_t,
            "labels": torch.from_numpy(labels),
            "image_id": image_id,
            "orig_size": orig_size,
            "size": (image.height, image.width),
            "scale": scale,
            "scale_xy": (image.width / orig_size[1], image.height / orig_size[0]),
        }
        return tensor, target


def collate(
    batch: Sequence[tuple[Tensor, Target]], size_divisor: int = 32
) -> tuple[Tensor, list[Target]]:
    """Stack ``(image (3, H_i, W_i), target)`` pairs into ``images (N, 3, Hp, Wp)``, zero-padded at the
    bottom and right to multiples of ``size_divisor`` (zero = the mean colour after normalisation), and the
    list of targets."""
    images = [im for im, _ in batch]
    hp = math.ceil(max(im.shape[1] for im in images) / size_divisor) * size_divisor
    wp = math.ceil(max(im.shape[2] for im in images) / size_divisor) * size_divisor
    out = images[0].new_zeros((len(images), 3, hp, wp))
    for n, im in enumerate(images):
        out[n, :, : im.shape[1], : im.shape[2]] = im
    return out, [t for _, t in batch]


# ------------------------------------------------------------------------------------------------- loaders


class EpochSampler(Sampler[int]):
    """Indices ``0..n-1``, shuffled by ``(seed, epoch)`` when ``shuffle``; ``set_epoch(epoch, start)``
    also skips the first ``start`` indices, to resume in the middle of an epoch."""

    def __init__(self, n: int, *, shuffle: bool = True, seed: int = 0) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        return torch.randperm(self.n, generator=_generator(self.seed, self.epoch)).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start:])

    def __len__(self) -> int:
        return max(0, self.n - self.start)


def set_epoch(loader: DataLoader, epoch: int, start_iter: int = 0) -> None:
    """Prepare ``loader`` (from ``build_loaders``) for ``epoch``, starting at batch ``start_iter``."""
    if isinstance(loader.sampler, EpochSampler):
        loader.sampler.set_epoch(epoch, start_iter * (loader.batch_size or 1))
    if isinstance(loader.dataset, DetectionDataset):
        loader.dataset.set_epoch(epoch)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; give numpy and random the same seed.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def build_loaders(
    data_dir: str | os.PathLike[str],
    val_split: float,
    seed: int,
    image_size: tuple[int, int],
    batch_size: int,
    num_workers: int,
) -> tuple[DataLoader, DataLoader, CocoData]:
    """Load and validate the dataset folder, split it, and return ``(train_loader, val_loader, data)``.

    The split is ``annotations.split``'s: the images' own ``split`` fields when they have them (train on
    ``train``/``trainval``, validate on ``val``, hold ``test`` out; ``test`` validates when there is no
    ``val``), else a seeded ``val_split`` draw.

    Batches are ``collate``'s ``(images, targets)``. The training loader shuffles with an ``EpochSampler``
    and flips; call ``set_epoch(loader, epoch)`` before each epoch. ``data.problems`` lists what was
    dropped. Raises ``DatasetError`` when no usable training image is left.
    """
    data = load_coco(data_dir)
    train_ids, val_ids = split(data, val_split, seed)
    if not train_ids:
        raise DatasetError("no usable training images" + (f": {data.problems[0]}" if data.problems else ""))
    common: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": num_workers,
        "collate_fn": collate,
        "worker_init_fn": _seed_worker,
        "generator": torch.Generator().manual_seed(seed),
        "pin_memory": torch.cuda.is_available(),
    }
    train_set = DetectionDataset(data, train_ids, image_size=image_size, train=True, seed=seed)
    val_set = DetectionDataset(data, val_ids, image_size=image_size, train=False, seed=seed)
    train_loader = DataLoader(train_set, sampler=EpochSampler(len(train_set), shuffle=True, seed=seed), **common)
    val_loader = DataLoader(val_set, shuffle=False, **common)
    return train_loader, val_loader, data

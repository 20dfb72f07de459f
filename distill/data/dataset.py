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
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from distill.data.annotations import CocoData, DatasetError, load_coco, split
from distill.data.images import normalize_image, read_image, rescale_size, resize_image
from distill.data.sampler import EpochSampler, GroupedBatchSampler, aspect_groups, seeded_generator

__all__ = [
    "DetectionDataset",
    "build_loaders",
    "collate",
    "default_workers",
    "hflip",
    "normalize",
    "resize",
    "set_epoch",
]

Target = dict[str, Any]
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
      exact per-axis factors: divide predicted x by ``sx`` and y by ``sy`` to get original pixels;
      ``flipped`` bool (image and boxes mirrored). ``(image_id, flipped)`` and the size name the pixels the
      model sees, which is what the teacher cache (``distill.teacher_cache``) keys on.

    With ``train=True`` each image is flipped with probability ``flip_prob``, and resized to one of ``scales``
    (``(long, short)`` limits) when given, both decided by ``(seed, epoch, image id)`` (``set_epoch`` before
    each epoch).
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
        scales: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        self.data = data
        self.scales = list(scales) if scales else None
        self.image_ids = list(image_ids)
        self.image_size = image_size
        self.train = train
        self.flip_prob = flip_prob
        self.seed = seed
        # In shared memory: persistent loader workers hold their own copy of the dataset, made once, and
        # must still see each new epoch (its flips).
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

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
            raise DatasetError(
                f"{info['file_name']}: image is {image.width}x{image.height}, "
                f"annotations say {info['width']}x{info['height']}"
            )
        orig_size = (image.height, image.width)
        image_size = self.image_size
        if self.train and self.scales:  # its own draw, so adding scales leaves the flips as they were
            pick = torch.randint(len(self.scales), (), generator=seeded_generator(self.seed, self.epoch, image_id, 1))
            image_size = self.scales[int(pick)]
        image, box_t, scale = resize(image, torch.from_numpy(boxes), image_size)
        tensor = normalize(image)
        flipped = False
        if self.train and self.flip_prob > 0:
            u = torch.rand((), generator=seeded_generator(self.seed, self.epoch, image_id)).item()
            if u < self.flip_prob:
                tensor, box_t = hflip(tensor, box_t)
                flipped = True
        target = {
            "boxes": box_t,
            "labels": torch.from_numpy(labels),
            "image_id": image_id,
            "orig_size": orig_size,
            "size": (image.height, image.width),
            "scale": scale,
            "scale_xy": (image.width / orig_size[1], image.height / orig_size[0]),
            "flipped": flipped,
        }
        return tensor, target


def collate(batch: Sequence[tuple[Tensor, Target]], size_divisor: int = 32) -> tuple[Tensor, list[Target]]:
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


def set_epoch(loader: DataLoader, epoch: int, start_iter: int = 0) -> None:
    """Prepare ``loader`` (from ``build_loaders``) for ``epoch``, starting at batch ``start_iter``."""
    if isinstance(loader.batch_sampler, GroupedBatchSampler):  # start_iter counts global batches
        loader.batch_sampler.set_epoch(epoch, start_iter)
    elif isinstance(loader.sampler, EpochSampler):  # start_iter counts global batches (all ranks' together)
        loader.sampler.set_epoch(epoch, start_iter * (loader.batch_size or 1) * loader.sampler.world)
    if isinstance(loader.dataset, DetectionDataset):
        loader.dataset.set_epoch(epoch)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; give numpy and random the same seed.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def default_workers(world: int = 1) -> int:
    """Loader workers per process when the spec leaves it open: this machine's cores shared between the
    ``world`` processes of the job, one kept for the training process itself, at least 1 and at most 8 (more
    mostly hold memory; ``bench/train_speed.py`` measures the share of a step spent waiting for data)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cores // max(world, 1) - 1))


def build_loaders(
    data_dir: str | os.PathLike[str],
    val_split: float,
    seed: int,
    image_size: tuple[int, int],
    batch_size: int,
    num_workers: int | None,
    scales: Sequence[tuple[int, int]] | None = None,
    *,
    rank: int = 0,
    world: int = 1,
    pin_memory: bool | None = None,
    split_seed: int = 0,
) -> tuple[DataLoader, DataLoader, CocoData]:
    """Load and validate the dataset folder, split it, and return ``(train_loader, val_loader, data)``.

    The split is ``annotations.split``'s: the images' own ``split`` fields when they have them (train on
    ``train``/``trainval``, validate on ``val``, hold ``test`` out; ``test`` validates when there is no
    ``val``), else a ``val_split`` draw seeded by ``split_seed`` (the data set's, fixed at upload). ``seed``, the
    job's training seed, orders the batches and draws the flips: it never moves an image between train and
    validation.

    Batches are ``collate``'s ``(images, targets)``. The training loader shuffles and batches with a
    ``GroupedBatchSampler`` (one aspect group per batch; ``EpochSampler``'s batches on single-group data)
    and flips (and draws one of ``scales`` per image when given); call ``set_epoch(loader, epoch)`` before
    each epoch. ``data.problems`` lists what was
    dropped. Raises ``DatasetError`` when no usable training image is left.

    One job over ``world`` processes: ``batch_size`` is this process's share of the global batch and the
    training loader reads rank ``rank``'s shard (``GroupedBatchSampler``); validation is rank 0's, whole.

    Loading defaults, so that the device does not wait for data: ``num_workers`` None means
    ``default_workers(world)``; ``pin_memory`` (None: when CUDA is present) lets the copy to the GPU run
    asynchronously; the training loader's workers persist across epochs (no fork and refill of the pipeline
    at each epoch: on a small data set that is a large share of an epoch); each worker keeps
    ``prefetch_factor = 2`` batches ready (more would hold more memory, up to 200 MB per batch of 16 at
    1333x800, without feeding the device faster: throughput comes from the number of workers).
    """
    data = load_coco(data_dir)
    train_ids, val_ids = split(data, val_split, split_seed)
    if not train_ids:
        raise DatasetError("no usable training images" + (f": {data.problems[0]}" if data.problems else ""))
    workers = default_workers(world) if num_workers is None else num_workers
    common: dict[str, Any] = {
        "batch_size": batch_size,
        "num_workers": workers,
        "collate_fn": collate,
        "worker_init_fn": _seed_worker,
        "generator": torch.Generator().manual_seed(seed),
        "pin_memory": torch.cuda.is_available() if pin_memory is None else pin_memory,
        "prefetch_factor": 2 if workers else None,
        # Workers start from a fresh server process, not by fork() of this one: a process that has loaded
        # libraries with fork handlers (OpenVINO after compiling bf16 and f32 models, seen crashing in fork)
        # or that runs threads (a worker's progress relay) forks unsafely. Persistent: started once per run.
        "multiprocessing_context": "forkserver" if workers else None,
    }
    train_set = DetectionDataset(data, train_ids, image_size=image_size, train=True, seed=seed, scales=scales)
    val_set = DetectionDataset(data, val_ids, image_size=image_size, train=False, seed=seed)
    # Training batches hold one aspect group each (landscape or portrait): less padding on mixed-size photos.
    groups = aspect_groups([(data.image(i)["width"], data.image(i)["height"]) for i in train_ids])
    batches = GroupedBatchSampler(groups, batch_size, shuffle=True, seed=seed, rank=rank, world=world)
    train_common = {k: v for k, v in common.items() if k != "batch_size"}
    train_loader = DataLoader(train_set, batch_sampler=batches, persistent_workers=workers > 0, **train_common)
    val_loader = DataLoader(val_set, shuffle=False, **common)
    return train_loader, val_loader, data

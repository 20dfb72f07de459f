"""Which images go into which batch: deterministic by ``(seed, epoch)``, resumable mid-epoch, sharded under DDP.

- :class:`EpochSampler`: indices in a seeded order (one process, or this rank's share of each global batch);
- :class:`GroupedBatchSampler`: batches whose images share an aspect group (landscape or portrait), as
  mmdetection's ``AspectRatioBatchSampler`` and torchvision's ``GroupedBatchSampler`` make them, so a batch of
  mixed-size photos is not padded to a canvas mostly made of padding. On data of one group it gives exactly
  :class:`EpochSampler`'s batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

_MIX = 1_000_003  # combines (seed, epoch, image id) into one generator seed


def seeded_generator(*keys: int) -> torch.Generator:
    """A torch generator seeded by ``keys`` (seed, epoch, image id, ...) alone: the same keys, the same draws."""
    seed = 0
    for k in keys:
        seed = (seed * _MIX + k) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


class EpochSampler(Sampler[int]):
    """Indices ``0..n-1``, shuffled by ``(seed, epoch)`` when ``shuffle``; ``set_epoch(epoch, start)``
    also skips the first ``start`` indices, to resume in the middle of an epoch.

    One job over ``world`` processes (``distill.ddp``): the same global order is cut into global batches of
    ``batch_size * world`` indices and rank ``rank`` takes its ``batch_size`` slice of each, so the ranks
    together see exactly the batches one process with the global batch sees, and ``start`` counts global
    indices (a run resumed with another number of processes goes on with the same order). A short last
    global batch is split as evenly as possible; a rank left without an index repeats that batch's first one
    (only when fewer images than processes remain), so every rank takes the same number of steps.
    """

    def __init__(
        self, n: int, *, shuffle: bool = True, seed: int = 0, batch_size: int = 1, rank: int = 0, world: int = 1
    ) -> None:
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        return torch.randperm(self.n, generator=seeded_generator(self.seed, self.epoch)).tolist()

    def __iter__(self) -> Iterator[int]:
        order = self.order()[self.start :]
        if self.world == 1:
            return iter(order)
        g = self.batch_size * self.world
        mine: list[int] = []
        for i in range(0, len(order), g):
            chunk = order[i : i + g]
            share = self._share(len(chunk))
            mine += chunk[share] if share.stop > share.start else chunk[:1]
        return iter(mine)

    def _share(self, m: int) -> slice:
        """This rank's slice of a global batch of ``m`` indices."""
        if m == self.batch_size * self.world:
            return slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return slice(self.rank * m // self.world, (self.rank + 1) * m // self.world)

    def __len__(self) -> int:
        remaining = max(0, self.n - self.start)
        if self.world == 1:
            return remaining
        full, rest = divmod(remaining, self.batch_size * self.world)
        share = self._share(rest)
        return full * self.batch_size + (max(1, share.stop - share.start) if rest else 0)


def aspect_groups(sizes: Sequence[tuple[int, int]]) -> list[int]:
    """Per image ``(width, height)``: group 0 when it is at least as wide as high, 1 when it is taller."""
    return [0 if w >= h else 1 for w, h in sizes]


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of indices of one aspect group each; ``set_epoch(epoch, start)`` skips the first ``start``
    global batches, to resume in the middle of an epoch.

    The epoch's order is :class:`EpochSampler`'s. Walking it, each index joins its group's bucket; a bucket that
    holds a global batch (``batch_size * world`` indices) is emitted, so the batches come in the order their
    last image appears. At the end, each group's leftover is one shorter batch of that group (never mixed).
    Over ``world`` processes each global batch is cut as :class:`EpochSampler` cuts it: the ranks' shares are
    disjoint and together are the global batch, and every rank takes the same number of steps.
    """

    def __init__(
        self,
        groups: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.groups, self.batch_size, self.world = list(groups), batch_size, world
        self.order_sampler = EpochSampler(len(self.groups), shuffle=shuffle, seed=seed, batch_size=batch_size,
                                          rank=rank, world=world)  # fmt: skip
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start
        self.order_sampler.set_epoch(epoch)

    def global_batches(self) -> list[list[int]]:
        """The epoch's global batches (all ranks' indices together), in order."""
        full = self.batch_size * self.world
        buckets: dict[int, list[int]] = {}
        out = []
        for i in self.order_sampler.order():
            bucket = buckets.setdefault(self.groups[i], [])
            bucket.append(i)
            if len(bucket) == full:
                out.append(bucket)
                buckets[self.groups[i]] = []
        out += [b for _, b in sorted(buckets.items()) if b]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches()[self.start :]:
            share = self.order_sampler._share(len(batch))
            yield batch[share] if share.stop > share.start else batch[:1]

    def __len__(self) -> int:
        return max(0, len(self.global_batches()) - self.start)

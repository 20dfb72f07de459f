"""Failures classified (issue 21): a process of the run killed from outside is retried, a failure of the job
itself is not, and the job's error says which."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from distill.__main__ import killed_from_outside


class _KilledOnRead(Dataset):
    """A dataset whose loader worker is killed by SIGKILL, as the OOM killer kills it."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(1)


def test_a_killed_dataloader_worker_is_a_kill_from_outside():
    loader = DataLoader(_KilledOnRead(), batch_size=2, num_workers=1, timeout=60)
    with pytest.raises(RuntimeError) as caught:
        next(iter(loader))
    assert killed_from_outside(caught.value), str(caught.value)


def test_the_jobs_own_failures_are_not():
    assert not killed_from_outside(RuntimeError("training diverged: loss is nan at epoch 1"))
    assert not killed_from_outside(ValueError("DataLoader worker killed by signal"))  # not torch's error
    assert not killed_from_outside(RuntimeError("CUDA error: an illegal memory access was encountered"))

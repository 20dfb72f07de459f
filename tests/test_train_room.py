"""A run that would fill the disk stops before writing a checkpoint, with the reason, and keeps its last good one."""

from __future__ import annotations

import errno

import pytest

from distill.checkpoint import read_checkpoint
from distill.data.synthetic import make_synthetic
from distill.files import NoRoom
from distill.spec import LocalJobSpec
from distill.train import Trainer


def test_checkpoint_refused_below_min_free_keeps_the_last_good_one(tmp_path):
    data = make_synthetic(tmp_path / "data", num_train=2, num_val=1, image_size=(96, 64), seed=0)
    spec = LocalJobSpec.model_validate(
        {
            "kind": "train",
            "dataset": str(data),
            "student": {"arch": "gfl_tiny"},
            "schedule": {"epochs": 2, "batch_size": 2, "image_size": [96, 64], "warmup_iters": 1, "num_workers": 0},
        }
    )

    def disk_fills_after_epoch_1(state: dict) -> None:
        if state["iter"] == 1:  # the epoch-1 checkpoint is written; then the disk "fills"
            trainer.min_free_bytes = 1 << 62

    trainer = Trainer(spec, tmp_path / "run", disk_fills_after_epoch_1, report_every_s=0)
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    with pytest.raises(NoRoom, match="No space left on device for a checkpoint") as e:
        trainer.run()
    assert e.value.errno == errno.ENOSPC
    assert read_checkpoint(last)["training"]["iteration"] == 1  # the last good checkpoint survives
    assert not [p for p in last.parent.iterdir() if p.name != "last.pt"]  # no partial file beside it

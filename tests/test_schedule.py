"""Warm-up and schedule sanity (issue 21): a short job's warm-up is capped and its log says so; step decays
outside the run are refused before queueing."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from distill.data.synthetic import make_synthetic
from distill.spec import JobSpec, LocalJobSpec
from distill.train import WARMUP_CAP, learning_rate, run, warmup_iters


def _job(**schedule) -> JobSpec:
    return JobSpec.model_validate({"kind": "train", "dataset": "ds_00000000", "schedule": schedule})


def test_warmup_is_capped_to_a_share_of_the_run_and_before_the_first_step():
    # 200 photos at batch 16, 12 epochs: 13 iterations per epoch, 156 in all; the default 500 never ends.
    job = _job(epochs=12, batch_size=16)
    used, why = warmup_iters(job, 13)
    assert used == 39 == round(WARMUP_CAP * 156) and "capped to 39" in why and "156 iterations" in why
    assert learning_rate(job, used, 13) == pytest.approx(job.schedule.base_lr)  # the rate arrives
    assert learning_rate(job, 0, 13) == pytest.approx(job.schedule.base_lr * 0.001)
    # A long run keeps its 500 iterations, and says nothing.
    assert warmup_iters(job, 1000) == (500, None)
    # A first decay at epoch 1 of 12 ends the warm-up there.
    early = _job(epochs=12, batch_size=16, steps=[1, 11], warmup_iters=100)
    used, why = warmup_iters(early, 50)
    assert used == 50 and "first learning-rate step at iteration 50" in why


def test_steps_outside_the_run_are_refused():
    for steps in ([0, 5], [5, 12], [13]):
        with pytest.raises(ValidationError, match="must lie within epochs 1..11"):
            _job(epochs=12, steps=steps)
    assert _job(epochs=12, steps=[8, 11]).schedule.lr_steps == (8, 11)


def test_a_short_jobs_log_and_metrics_say_the_warmup_was_capped(tmp_path: Path):
    data = make_synthetic(tmp_path / "data", num_train=4, num_val=2, image_size=(96, 64), seed=1)
    spec = LocalJobSpec.model_validate({
        "kind": "train", "dataset": str(data), "student": {"arch": "gfl_tiny"}, "seed": 0,
        "schedule": {"epochs": 2, "batch_size": 2, "image_size": [96, 64], "num_workers": 0},
    })  # fmt: skip
    metrics = run(spec, tmp_path / "run")
    assert metrics["warmup_iters"] == 1  # 4 iterations in all: a quarter of them
    assert "warm-up 500 iterations capped to 1" in (tmp_path / "run" / "train.log").read_text()

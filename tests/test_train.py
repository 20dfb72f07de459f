"""The training loop: learning for real, exact resume, divergence, the command line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.checkpoint import read_checkpoint
from distill.data.synthetic import make_synthetic
from distill.spec import LocalJobSpec
from distill.train import Stopped, Trainer, TrainingError, run


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synth"), num_train=6, num_val=2, image_size=(128, 96), seed=3)


def _spec(dataset: Path, **schedule) -> LocalJobSpec:
    sched = {
        "epochs": 2,
        "batch_size": 2,
        "image_size": [128, 96],
        "warmup_iters": 2,
        "num_workers": 0,
        "lr": 0.01,
        **schedule,
    }
    return LocalJobSpec.model_validate(
        {"kind": "train", "dataset": str(dataset), "student": {"arch": "gfl_tiny"}, "schedule": sched, "seed": 1}
    )


@pytest.mark.slow
def test_tiny_model_overfits_a_handful_of_images(tmp_path):
    # 4 images, 7 digits of 32-120 px, evaluated on the same images: the whole pipeline must learn them.
    data = make_synthetic(
        tmp_path / "data",
        num_train=4,
        num_val=0,
        image_size=(128, 128),
        seed=0,
        min_objects=1,
        max_objects=2,
        min_size=32,
    )
    spec = LocalJobSpec.model_validate(
        {
            "kind": "train",
            "dataset": str(data),
            "val_split": 0.0,
            "student": {"arch": "gfl_tiny"},
            "schedule": {
                "epochs": 200,
                "batch_size": 4,
                "lr": 0.04,
                "image_size": [128, 128],
                "warmup_iters": 20,
                "steps": [160, 186],
                "num_workers": 0,
            },
        }
    )
    metrics = run(spec, tmp_path / "run")
    assert metrics["bbox"]["AP50"] > 0.9, metrics


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(out / "model.pt")["state_dict"]


def test_resume_mid_epoch_and_after_crash_equals_uninterrupted(tiny_set, tmp_path):
    spec = _spec(tiny_set)
    run(spec, tmp_path / "straight")
    reference = _final_weights(tmp_path / "straight")

    # Stopped (SIGTERM path) in the middle of epoch 2: a checkpoint is written at iteration 4 of 6.
    def stop_at_4(state):
        if state["iter"] == 4:
            trainer.stop_requested = True

    trainer = Trainer(spec, tmp_path / "stopped", stop_at_4, report_every_s=0)
    with pytest.raises(Stopped):
        trainer.run()
    assert read_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")["training"]["iteration"] == 4
    metrics = run(spec, tmp_path / "stopped")
    assert metrics["resumed_from_iter"] == 4

    # Crashed right after epoch 1's checkpoint (a killed worker): the next run starts from iteration 3.
    def crash_after_epoch_1(state):
        if state["iter"] == 3:
            raise RuntimeError("worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        run(spec, tmp_path / "crashed", crash_after_epoch_1)
    assert run(spec, tmp_path / "crashed")["resumed_from_iter"] == 3

    for out in ("stopped", "crashed"):
        resumed = _final_weights(tmp_path / out)
        assert resumed.keys() == reference.keys()
        assert all(torch.equal(resumed[k], reference[k]) for k in reference), out
    # The epoch before the crash is not trained again: the resumed attempt never reports an iteration below 3.
    states = [json.loads(line) for line in (tmp_path / "crashed" / "progress.jsonl").read_text().splitlines()]
    resumed = [s["iter"] for s in states if s["resumed_from_iter"] == 3]
    assert min(resumed) == 3 and max(resumed) == 6


def test_a_run_folder_resumes_only_the_same_run(tiny_set, tmp_path):
    spec = _spec(tiny_set, epochs=1)
    run(spec, tmp_path / "run")
    other = spec.model_copy(update={"seed": 2})
    with pytest.raises(TrainingError, match=r"different run \(differs in: seed\)"):
        run(other, tmp_path / "run")
    lr = spec.model_copy(update={"schedule": spec.schedule.model_copy(update={"lr": 0.02})})
    with pytest.raises(TrainingError, match=r"differs in: schedule\.lr"):
        run(lr, tmp_path / "run")
    # A new name is the same run: it resumes (here: at its end).
    renamed = spec.model_copy(update={"name": "again"})
    assert run(renamed, tmp_path / "run")["resumed_from_iter"] == 3


def test_divergence_stops_with_a_clear_error(tiny_set, tmp_path):
    with pytest.raises(TrainingError, match="diverged"):
        run(_spec(tiny_set, lr=1e6, warmup_iters=0, grad_clip=None), tmp_path / "run")


def test_checkpoint_holds_training_state(tiny_set, tmp_path):
    spec = _spec(tiny_set, epochs=1)
    metrics = run(spec, tmp_path / "run")
    ckpt = read_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert set(ckpt["training"]) >= {"iteration", "optimizer", "scheduler", "rng"}
    assert ckpt["arch"] == "gfl_tiny" and ckpt["meta"]["input_size"] == [128, 96]
    assert set(metrics["bbox"]) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["bbox"] == metrics["bbox"]
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    assert progress["phase"] == "done" and progress["iter"] == progress["total_iters"] == 3


def test_command_line_runs_a_spec_and_reports_bad_specs(tiny_set, tmp_path):
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(_spec(tiny_set, epochs=1).model_dump_json())
    done = subprocess.run(
        [sys.executable, "-m", "distill", "train", str(spec_path), "--out", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "model.pt").exists() and (tmp_path / "run" / "metrics.json").exists()

    spec_path.write_text(json.dumps({"kind": "train", "dataset": str(tiny_set), "distill": {"tau": -1}}))
    bad = subprocess.run(
        [sys.executable, "-m", "distill", "train", str(spec_path), "--out", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "tau" in json.loads((tmp_path / "bad" / "error.json").read_text())["error"]

"""Initialisation of the model a job trains: torchvision's ImageNet weights through its own weights API and
cache (no network: each test prepares the cache), detector and backbone checkpoints, the mmdetection
fixture into a student with other classes, and the frozen-backbone recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from distill.checkpoint import atomic_save, build_detector, detector_state, read_checkpoint
from distill.ckpt_layout import describe_checkpoint
from distill.init import initialise
from distill.models.gfl import GFL, DetectorConfig
from distill.spec import IMAGENET_URLS, InitPath, LocalJobSpec
from tests.shared_data import needs_shared, shared_path

MMDET = shared_path("fixtures/mmdet_gfl_r18_c64.pth")


def test_imagenet_table_is_torchvisions():
    for arch, url in IMAGENET_URLS.items():
        depth = int(arch.rsplit("_r", 1)[1])  # every family: <family>_r18 ... _r101
        assert getattr(torchvision.models, f"ResNet{depth}_Weights").IMAGENET1K_V1.url == url


def _random_resnet_file(folder: Path, depth: int) -> dict[str, torch.Tensor]:
    """A ResNet state dict with random values saved under torchvision's file name, as its cache holds it."""
    torch.manual_seed(depth)
    state = getattr(torchvision.models, f"resnet{depth}")().state_dict()
    for v in state.values():
        if v.is_floating_point():
            v.normal_()
    name = IMAGENET_URLS[f"gfl_r{depth}"].rsplit("/", 1)[1]
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / name)
    return state


@pytest.mark.parametrize("depth", [18, 50])
def test_imagenet_init_through_torchvisions_cache(tmp_path, monkeypatch, depth):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    expected = _random_resnet_file(tmp_path / "torch_home" / "hub" / "checkpoints", depth)
    spec = LocalJobSpec.model_validate(
        {"kind": "train", "dataset": "x", "student": {"arch": f"gfl_r{depth}", "init": "imagenet"}}
    )
    model = build_detector(
        spec.student.arch,
        2,
        ["a", "b"],
        frozen_stages=spec.student.backbone_frozen_stages,
        norm_eval=spec.student.backbone_norm_eval,
    )
    report = initialise(model, spec.student.init)
    body = model.backbone.state_dict()
    compared = 0
    for k, v in expected.items():
        if k.startswith("fc."):
            continue
        assert torch.equal(body[k], v), k
        compared += 1
    assert compared > 50 and report.summary()["loaded"] == len([k for k in expected if not k.startswith("fc.")])
    assert report.source == f"imagenet:resnet{depth}" and any(k.startswith("bbox_head") for k in report.fresh)
    # mmdetection's recipe with pretrained weights: stem and stage 1 frozen, batch-norm statistics frozen.
    assert not any(p.requires_grad for p in model.backbone.conv1.parameters())
    assert not any(p.requires_grad for p in model.backbone.layer1.parameters())
    assert all(p.requires_grad for p in model.backbone.layer2.parameters())
    model.train()
    assert not model.backbone.layer3[0].bn1.training and model.neck.training


def test_imagenet_weights_dir_overrides_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    expected = _random_resnet_file(tmp_path / "service_weights", 18)
    model = build_detector("gfl_r18", 1)
    initialise(model, "imagenet", weights_dir=tmp_path / "service_weights")
    assert torch.equal(model.backbone.conv1.weight, expected["conv1.weight"])


def test_from_scratch_trains_the_whole_backbone():
    spec = LocalJobSpec.model_validate({"kind": "train", "dataset": "x", "student": {"arch": "gfl_tiny"}})
    model = build_detector(
        "gfl_tiny", 1, frozen_stages=spec.student.backbone_frozen_stages, norm_eval=spec.student.backbone_norm_eval
    )
    assert initialise(model, None).summary()["loaded"] == 0
    assert all(p.requires_grad for p in model.parameters())


@needs_shared("fixtures/mmdet_gfl_r18_c64.pth")
def test_mmdetection_checkpoint_into_a_student_with_other_classes():
    fixture = read_checkpoint(MMDET)["state_dict"]
    cfg = DetectorConfig(depth=18, base_width=64, channels=64, stacked_convs=2, num_classes=1, classes=["cell"])
    model = GFL(cfg)
    fresh_cls = model.bbox_head.gfl_cls.weight.detach().clone()
    report = initialise(model, InitPath(path=str(MMDET)))
    own = model.state_dict()
    for k, v in fixture.items():
        if k.startswith("bbox_head.gfl_cls."):
            continue
        assert torch.equal(own[k], v), k
    assert torch.equal(model.bbox_head.gfl_cls.weight, fresh_cls)  # the class layer started fresh
    assert report.fresh == ["bbox_head.gfl_cls.weight", "bbox_head.gfl_cls.bias", "bbox_head.integral.project"] or set(
        report.fresh
    ) >= {"bbox_head.gfl_cls.weight", "bbox_head.gfl_cls.bias"}
    assert any("classes differ" in n for n in report.notes)


def test_detector_checkpoint_with_the_same_classes_loads_everything(tmp_path):
    teacher = build_detector("gfl_tiny", 2, ["cat", "dog"])
    atomic_save(detector_state(teacher), tmp_path / "t.pt")
    student = build_detector("gfl_tiny", 2, ["Cat", "Dog"])  # names match case-insensitively
    report = initialise(student, InitPath(path=str(tmp_path / "t.pt")))
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in student.state_dict().items())
    assert report.notes == []


@pytest.mark.parametrize("layout", ["torchvision", "mmdetection"])
def test_backbone_checkpoint(tmp_path, layout):
    state = _random_resnet_file(tmp_path, 18)
    if layout == "mmdetection":
        state = {
            "state_dict": {f"backbone.{k}": v for k, v in state.items() if not k.startswith("fc.")},
            "meta": {"mmdet_version": "3.3.0"},
        }
    path = tmp_path / "backbone.pth"
    torch.save(state, path)
    info = describe_checkpoint(path)  # the torch-free reader the API uses at upload
    assert info["kind"] == "backbone" and info["depth"] == 18 and info["layout"] == layout
    model = build_detector("gfl_r18", 3)
    report = initialise(model, InitPath(path=str(path)))
    assert report.source.startswith("backbone:") and report.summary()["loaded"] == 120
    assert torch.equal(
        model.backbone.layer4[1].conv2.weight,
        (state.get("state_dict") or state)[("backbone." if layout == "mmdetection" else "") + "layer4.1.conv2.weight"],
    )


def test_checkpoint_that_fits_nothing_is_refused(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(ValueError, match="ResNet-18 of width 64 does not fit the backbone of gfl_tiny"):
        initialise(build_detector("gfl_tiny", 1), InitPath(path=str(path)))


def test_the_jobs_metrics_say_what_was_loaded(tmp_path):
    from distill.data.synthetic import make_synthetic
    from distill.train import run

    data = make_synthetic(tmp_path / "data", num_train=2, num_val=1, image_size=(96, 64), seed=0)
    teacher = build_detector("gfl_tiny", 3, ["car", "bus", "person"])  # other classes than the digits
    atomic_save(detector_state(teacher), tmp_path / "digits.pt")
    init = {"path": str(tmp_path / "digits.pt")}
    spec = LocalJobSpec.model_validate(
        {
            "kind": "train",
            "dataset": str(data),
            "student": {"arch": "gfl_tiny", "init": init},
            "schedule": {"epochs": 1, "batch_size": 2, "image_size": [96, 64], "warmup_iters": 1, "num_workers": 0},
        }
    )
    metrics = run(spec, tmp_path / "run")
    init = metrics["init"]
    assert init["source"] == "detector:digits.pt" and init["loaded"] > 0 and init["fresh"] >= 2
    assert init["first_fresh"][:2] == ["bbox_head.gfl_cls.weight", "bbox_head.gfl_cls.bias"]
    assert metrics == __import__("json").loads((tmp_path / "run" / "metrics.json").read_text())

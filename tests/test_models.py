"""Detector shapes, architecture inference and mmdetection checkpoint compatibility."""

import json

import pytest
import torch

import distill
from distill.checkpoint import CheckpointError, build_detector, detector_state, infer_config, read_checkpoint
from distill.models.gfl import GFL
from distill.spec import ARCHITECTURES
from tests.shared_data import FIXTURES, needs_shared, shared_path

MMDET_GFL = shared_path("fixtures/mmdet_gfl_r18_c64.pth")


def test_raw_output_shapes_match_mmdetection_layout():
    model = build_detector("gfl_tiny", num_classes=3).eval()
    cls, reg = model.raw_outputs(torch.randn(2, 3, 96, 128))
    assert [tuple(c.shape) for c in cls] == [(2, 3, 12, 16), (2, 3, 6, 8), (2, 3, 3, 4), (2, 3, 2, 2), (2, 3, 1, 1)]
    assert all(r.shape[1] == 4 * 17 and r.shape[2:] == c.shape[2:] for r, c in zip(reg, cls, strict=True))


def test_decode_and_predict_are_consistent():
    torch.manual_seed(0)
    model = build_detector("gfl_tiny", num_classes=2).eval()
    model.bbox_head.gfl_cls.bias.data.fill_(0.0)  # scores ~0.5 so that detections exist
    images = torch.randn(1, 3, 64, 96)
    boxes, scores, counts = model.decode(*model.raw_outputs(images))
    assert boxes.shape == (1, sum(counts), 4) and scores.shape == (1, sum(counts), 2)
    assert (boxes[..., 2:] >= boxes[..., :2]).all()
    det = model.predict(images)[0]
    assert 0 < len(det["boxes"]) <= 100
    assert (det["scores"] > 0.05).all() and det["labels"].max() < 2
    assert (det["boxes"][:, 2] <= 96).all() and (det["boxes"][:, 3] <= 64).all()


# The other families' sizes: tests/test_families_models.py.
@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if a.startswith("gfl_")])
def test_architecture_is_inferred_from_state_dict(arch):
    model = build_detector(arch, num_classes=5)
    cfg = infer_config(model.state_dict())
    assert (cfg.depth, cfg.base_width, cfg.channels, cfg.stacked_convs, cfg.num_classes, cfg.reg_max) == (
        model.cfg.depth,
        model.cfg.base_width,
        model.cfg.channels,
        model.cfg.stacked_convs,
        5,
        16,
    )


def test_project_checkpoint_round_trip(tmp_path):
    model = build_detector("gfl_tiny", num_classes=2, classes=["cat", "dog"])
    torch.save(detector_state(model, {"input_size": [320, 256]}), tmp_path / "m.pt")
    loaded = distill.load_detector(tmp_path / "m.pt")
    assert not loaded.training and loaded.classes == ["cat", "dog"] and loaded.arch == "gfl_tiny"
    x = torch.randn(1, 3, 64, 64)
    model.eval()
    for a, b in zip(model.raw_outputs(x)[1], loaded.raw_outputs(x)[1], strict=True):
        assert torch.equal(a, b)


@needs_shared("fixtures/mmdet_gfl_r18_c64.pth")
def test_mmdetection_fixture_reproduces_raw_outputs():
    model = distill.load_detector(MMDET_GFL)
    cfg = json.loads((FIXTURES / "mmdet_gfl_r18_c64_config.json").read_text())
    assert model.num_classes == cfg["head"]["num_classes"] and model.cfg.stacked_convs == cfg["head"]["stacked_convs"]
    assert model.cfg.channels == cfg["neck"]["out_channels"] and list(model.strides) == cfg["head"]["strides"]
    io = torch.load(FIXTURES / "mmdet_gfl_r18_c64_io.pt", weights_only=True)
    cls, reg = model.raw_outputs(io["input"])
    for ours, theirs in zip(cls + reg, list(io["cls_scores"]) + list(io["bbox_preds"]), strict=True):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() < 1e-4


def test_paper_teacher_key_layout_maps_completely():
    keys = json.loads((FIXTURES / "gfl_r101_coco_keys.json").read_text())
    state = {k: torch.zeros(shape) for k, shape in keys.items()}
    cfg = infer_config(state)
    assert (cfg.depth, cfg.base_width, cfg.channels, cfg.stacked_convs, cfg.num_classes) == (101, 64, 256, 4, 80)
    ours = GFL(cfg).state_dict()
    assert set(ours) == set(keys)
    assert all(list(ours[k].shape) == keys[k] for k in keys)


@needs_shared("fixtures/mmdet_gfl_r18_c64.pth")
def test_mmengine_checkpoint_with_foreign_objects_is_read_without_running_them(tmp_path):
    # A checkpoint that pickles an arbitrary class: it must be read as inert data, never imported/called.
    state = torch.load(MMDET_GFL, weights_only=True)
    state["message_hub"] = _Exploding()
    torch.save(state, tmp_path / "mm.pth")
    model = distill.load_detector(tmp_path / "mm.pth")
    assert model.num_classes == 3


def test_garbage_checkpoint_is_refused(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        read_checkpoint(tmp_path / "bad.pt")


class _Exploding:
    def __reduce__(self):
        return (_explode, ("this must never run",))


def _explode(msg):
    raise AssertionError(msg)

"""mmdetection's standard RetinaNet, FCOS and ATSS (issue 19): parity with mmdetection's own outputs on the three
fixtures (checkpoints regenerated from their seeds into a temporary folder), the config options no shape shows,
the two-bin spread that makes them LD teachers, and their tensors initialising a family student."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api import deps
from api.errors import install_error_handlers
from api.routes import checkpoints as checkpoints_routes
from core.checks import JobRefused, check_job
from core.settings import Settings
from core.store import Store
from distill.checkpoint import load_detector
from distill.ckpt_layout import describe_checkpoint
from distill.ckpt_reader import CheckpointError
from distill.data.images import MEAN, STD
from distill.data.synthetic import make_synthetic
from distill.init import initialise
from distill.locations import retina_anchors
from distill.losses.gfl import distribution_focal_loss
from distill.losses.ld import ld_loss
from distill.mmdet_standard import parse_config_text
from distill.models.backbone import ResNet
from distill.models.config import DetectorConfig
from distill.models.detector import Detector
from distill.models.spread_teacher import EMPTY_BIN, SpreadTeacher, spread_teacher, two_bin_spread
from distill.models.standard import StandardDetector, caffe_style, delta_to_box
from distill.spec import InitPath, JobSpec, LocalJobSpec
from distill.train import run

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ("retina", "fcos", "atss")
_spec = importlib.util.spec_from_file_location("make_checkpoint", FIXTURES / "make_checkpoint.py")
assert _spec is not None and _spec.loader is not None
make_checkpoint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_checkpoint)


def _spec_of(family: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"mmdet_{family}_r18_c64_spec.json").read_text())


def _write(tmp_path: Path, family: str, cfg: str | None = "keep", key: str = "cfg") -> Path:
    """The fixture's checkpoint; ``cfg`` replaces its config text (None: no text), stored under ``key``."""
    spec = _spec_of(family)
    text = spec["meta"].pop("cfg")
    if cfg is not None:
        spec["meta"][key] = text if cfg == "keep" else cfg
    spec_path, out = tmp_path / f"{family}_spec.json", tmp_path / f"{family}.pth"
    spec_path.write_text(json.dumps(spec))
    make_checkpoint.write_checkpoint(spec_path, out)
    return out


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("mmdet_standard")
    return {family: _write(folder, family) for family in FAMILIES}


def _worst(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Absolute error, relative where the reference exceeds 1 in magnitude."""
    return ((ref - got).abs() / ref.abs().clamp(min=1)).max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_raw_outputs_match_mmdetection(checkpoints: dict[str, Path], family: str):
    model = load_detector(checkpoints[family])
    assert isinstance(model, StandardDetector) and model.family == family
    io = torch.load(FIXTURES / f"mmdet_{family}_r18_c64_io.pt", weights_only=True)
    with torch.no_grad():
        outs = model.raw_outputs(io["input"])
    assert len(outs) == len(io["outputs"]) == (2 if family == "retina" else 3)
    for name, ref_levels, got_levels in zip(io["names"], io["outputs"], outs, strict=True):
        assert len(got_levels) == 5
        for ref, got in zip(ref_levels, got_levels, strict=True):
            assert got.shape == ref.shape, name
            assert _worst(ref, got) < 1e-4, (family, name, _worst(ref, got))


@pytest.mark.parametrize("family", FAMILIES)
def test_upload_reader_describes_standard_form(checkpoints: dict[str, Path], family: str):
    info = describe_checkpoint(checkpoints[family])  # torch-free: what the API stores at upload
    assert (info["kind"], info["family"], info["form"]) == ("detector", family, "standard")
    assert info["reg_max"] is None  # no bins: the job check must not compare them with the student's
    assert (info["depth"], info["channels"], info["stacked_convs"], info["num_classes"]) == (18, 64, 2, 3)
    assert info["num_anchors"] == (9 if family == "retina" else 1)
    assert info["classes"] == ["class_0", "class_1", "class_2"]
    opts = info["options"]
    assert opts["style"] == ("caffe" if family == "fcos" else "pytorch")
    assert opts["extra_on_input"] == (family == "retina") and opts["relu_before_extra"] == (family == "fcos")
    if family == "fcos":
        assert (opts["norm_on_bbox"], opts["centerness_on_reg"], opts["center_sampling"]) == (False, False, False)
        assert opts["input"] == {"mean": [102.9801, 115.9465, 122.7717], "std": [1.0, 1.0, 1.0], "rgb": False}
    else:
        assert opts["coder_stds"] == ([1.0] * 4 if family == "retina" else [0.1, 0.1, 0.2, 0.2])


def _fcos_with(tmp_path: Path, option: str) -> StandardDetector:
    text = _spec_of("fcos")["meta"]["cfg"]
    assert text.count("type='FCOSHead'") == 1
    path = _write(tmp_path, "fcos", text.replace("type='FCOSHead'", f"{option}, type='FCOSHead'"))
    model = load_detector(path)
    assert isinstance(model, StandardDetector)
    return model


def test_fcos_norm_on_bbox_and_centerness_tower_follow_the_config(tmp_path: Path):
    plain, normed = load_detector(_write(tmp_path, "fcos")), _fcos_with(tmp_path, "norm_on_bbox=True")
    on_reg = _fcos_with(tmp_path, "centerness_on_reg=True")
    assert normed.info["options"]["norm_on_bbox"] and on_reg.info["options"]["centerness_on_reg"]
    images = torch.randn(1, 3, 64, 96)
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        plain.bbox_head.conv_reg.register_forward_hook(lambda m, i, o: seen.setdefault("reg", o)),
        plain.bbox_head.cls_convs[-1].register_forward_hook(lambda m, i, o: seen.setdefault("cls_tower", o)),
        plain.bbox_head.reg_convs[-1].register_forward_hook(lambda m, i, o: seen.setdefault("reg_tower", o)),
    ]
    with torch.no_grad():
        _, d_plain, ctr_plain = (x[0] for x in plain.raw_outputs(images))  # level 0, stride 8
        _, d_normed, _ = (x[0] for x in normed.raw_outputs(images))
        _, _, ctr_on_reg = (x[0] for x in on_reg.raw_outputs(images))
    for h in hooks:
        h.remove()
    scaled = seen["reg"] * plain.bbox_head.scales[0].scale
    # mmdetection's FCOSHead in eval: exp(scale * x), or ReLU(scale * x) * stride with norm_on_bbox.
    torch.testing.assert_close(d_plain, scaled.exp())
    torch.testing.assert_close(d_normed, scaled.clamp(min=0) * 8)
    assert not torch.allclose(d_plain, d_normed)
    ctr_conv = plain.bbox_head.conv_centerness
    torch.testing.assert_close(ctr_plain, ctr_conv(seen["cls_tower"]))
    torch.testing.assert_close(ctr_on_reg, ctr_conv(seen["reg_tower"]))
    # Decoding: points at ((x + 0.5) * s, (y + 0.5) * s), box = point -/+ distances.
    with torch.no_grad():
        boxes, _, counts = normed.decode(*normed.raw_outputs(images))
    h, w = d_normed.shape[-2:]
    px, py = (torch.arange(w) + 0.5) * 8, (torch.arange(h) + 0.5) * 8
    x1 = px[None, :] - d_normed[0, 0]
    torch.testing.assert_close(boxes[0, : counts[0], 0], x1.reshape(-1))
    torch.testing.assert_close(boxes[0, : counts[0], 3], (py[:, None] + d_normed[0, 3]).reshape(-1))


def test_missing_config_text(tmp_path: Path):
    with pytest.raises(CheckpointError, match="norm_on_bbox.*meta\\['cfg'\\]"):
        load_detector(_write(tmp_path, "fcos", cfg=None))
    # mmdetection 2.x keeps the text under meta['config'].
    model = load_detector(_write(tmp_path, "fcos", key="config"))
    assert isinstance(model, StandardDetector) and model.info["options"]["style"] == "caffe"
    # RetinaNet without text: nothing that changes its outputs is unknown; the defaults it took are listed.
    info = describe_checkpoint(_write(tmp_path, "retina", cfg=None))
    assert {"anchors", "coder_stds", "input"} <= set(info["options"]["assumed"])


def test_config_text_is_parsed_never_run(tmp_path: Path):
    flag = tmp_path / "ran"
    text = f"x = __import__('pathlib').Path({str(flag)!r}).touch()\nmodel = dict(a=[1, -2.5, (3, 4)], b=None)\n"
    assert parse_config_text(text) == {"model": {"a": [1, -2.5, [3, 4]], "b": None}}
    assert not flag.exists()


def test_caffe_style_moves_the_stride_to_the_1x1_conv():
    torch.manual_seed(0)
    pytorch, caffe = ResNet(50, 16), ResNet(50, 16)
    caffe.load_state_dict(pytorch.state_dict())
    caffe_style(caffe)
    block = caffe.layer2[0]
    assert (block.conv1.stride, block.conv2.stride) == ((2, 2), (1, 1))
    assert pytorch.layer2[0].conv2.stride == (2, 2)
    pytorch.eval(), caffe.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = pytorch(x), caffe(x)
    assert [t.shape for t in a] == [t.shape for t in b]
    assert not torch.allclose(a[0], b[0])
    basic = ResNet(18, 16)
    caffe_style(basic)  # BasicBlocks have one 3x3 conv with the stride in both styles
    assert basic.layer2[0].conv1.stride == (2, 2)


def test_delta_decoding_by_hand():
    anchors = torch.tensor([[0.0, 0.0, 20.0, 10.0]])  # centre (10, 5), size (20, 10)
    deltas = torch.tensor([[1.0, -1.0, 2.0, 0.0]])  # centre (10 + 20 * 0.1, 5 - 10 * 0.1), w x e^0.4, h x 1
    box = delta_to_box(anchors, deltas, [0.1, 0.1, 0.2, 0.2])
    w = 20 * torch.exp(torch.tensor(0.4))
    torch.testing.assert_close(box, torch.stack([12 - w / 2, torch.tensor(-1.0), 12 + w / 2, torch.tensor(9.0)])[None])
    huge = delta_to_box(anchors, torch.tensor([[0.0, 0.0, 100.0, -100.0]]), [1.0] * 4)  # clamped to 1000/16
    torch.testing.assert_close(huge[0, 2] - huge[0, 0], torch.tensor(20 * 1000 / 16))
    torch.testing.assert_close(huge[0, 3] - huge[0, 1], torch.tensor(10 * 16 / 1000))


def test_two_bin_spread_by_hand():
    p = two_bin_spread(torch.tensor([0.0, 2.25, 7.0, 15.5, 16.0, 20.0, -3.0]), reg_max=16)
    expected = torch.zeros(7, 17)
    expected[0, 0] = 1
    expected[1, 2], expected[1, 3] = 0.75, 0.25
    expected[2, 7] = 1
    expected[3, 15], expected[3, 16] = 0.5, 0.5
    expected[4, 16] = 1  # reg_max itself: all on the last bin
    expected[5, 16] = 1  # beyond reg_max: clipped
    expected[6, 0] = 1  # behind the point: clipped to 0
    torch.testing.assert_close(p, expected)
    edges = torch.rand(1000) * 20 - 2
    p = two_bin_spread(edges, reg_max=16)
    assert ((p > 0).sum(-1) <= 2).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(1000))
    torch.testing.assert_close(p @ torch.arange(17.0), edges.clamp(0, 16))


@pytest.mark.parametrize("family", FAMILIES)
def test_spread_teacher_decodes_the_teachers_boxes(checkpoints: dict[str, Path], family: str):
    standard = load_detector(checkpoints[family])
    assert isinstance(standard, StandardDetector)
    reg = getattr(standard.bbox_head, standard.bbox_head.reg_name)
    with torch.no_grad():  # boxes of sensible size, so that most edges lie within the student's bins
        reg.weight.mul_(0.02)
        if family == "fcos":
            reg.bias.fill_(3.5)
    teacher = spread_teacher(standard, reg_max=16)
    assert isinstance(teacher, SpreadTeacher) and isinstance(teacher, Detector) and teacher.hard_edge_targets
    assert (teacher.family, teacher.reg_max, teacher.classes) == (family, 16, ["class_0", "class_1", "class_2"])
    assert teacher.num_anchors == (9 if family == "retina" else 1) and teacher.has_quality == (family != "retina")
    torch.manual_seed(0)
    images = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        raw = teacher.raw_outputs(images)
        boxes, scores, counts = teacher.decode(*raw)
        ref_boxes, ref_scores, ref_counts = standard.decode(*standard.raw_outputs(standard.adapt_input(images)))
    assert counts == ref_counts and raw[1][0].shape[1] == teacher.num_anchors * 4 * 17
    _, reg_flat = teacher.flatten(raw[0], raw[1])
    torch.testing.assert_close(F.softmax(reg_flat, -1).sum(-1), torch.ones(reg_flat.shape[:-1]))
    points, strides, _ = teacher.locations(raw[0])
    edges = torch.cat([points - ref_boxes[..., :2], ref_boxes[..., 2:] - points], -1) / strides[None, :, None]
    inside = ((edges >= 0) & (edges <= 16)).all(-1)
    assert inside.float().mean() > 0.9
    torch.testing.assert_close(boxes[inside], ref_boxes[inside], atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(scores, ref_scores)
    if family == "retina":  # the nine anchors around each point are our retina family's, in the same order
        priors, _ = standard.priors(raw[0])
        torch.testing.assert_close(priors, retina_anchors(points, strides))
        torch.testing.assert_close(teacher.anchors(points, strides), priors)


@pytest.mark.parametrize("family", ["fcos", "retina"])
def test_initialises_a_family_student(checkpoints: dict[str, Path], family: str):
    cfg = DetectorConfig(family=family, depth=18, base_width=64, channels=64, stacked_convs=2, num_classes=3)
    student = Detector(cfg, f"{family}_test")
    report = initialise(student, InitPath(path=str(checkpoints[family])))
    loaded, fresh = set(report.loaded), set(report.fresh)
    assert "backbone.layer4.1.conv2.weight" in loaded and "neck.lateral_convs.0.conv.weight" in loaded
    assert "bbox_head.cls_convs.1.conv.weight" in loaded
    reg = "bbox_head.conv_reg.weight" if family == "fcos" else "bbox_head.retina_reg.weight"
    assert reg in fresh  # 4 numbers per edge vs a distribution: starts fresh
    if family == "fcos":  # GN towers alike; RetinaNet's towers have no GN, its P6 conv reads C5
        assert {"bbox_head.reg_convs.0.gn.weight", "bbox_head.conv_cls.weight"} <= loaded
    else:
        assert "neck.fpn_convs.3.conv.weight" in fresh
    standard = load_detector(checkpoints[family])
    torch.testing.assert_close(
        student.state_dict()["backbone.layer4.1.conv2.weight"], standard.state_dict()["backbone.layer4.1.conv2.weight"]
    )


def test_ld_at_tau_1_on_the_spread_is_dfl_towards_the_teachers_edge():
    torch.manual_seed(0)
    edges = torch.rand(64) * 15.9  # DFL's range [0, reg_max)
    student = torch.randn(64, 17, requires_grad=True)
    teacher_logits = two_bin_spread(edges, 16).clamp_min(EMPTY_BIN).log()
    ld = ld_loss(student, teacher_logits, tau=1.0)
    dfl = distribution_focal_loss(student, edges)
    p = two_bin_spread(edges, 16)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    torch.testing.assert_close(ld, dfl - entropy, atol=1e-5, rtol=1e-5)  # KL = cross-entropy - entropy
    (g_ld,) = torch.autograd.grad(ld.sum(), student)
    (g_dfl,) = torch.autograd.grad(dfl.sum(), student)
    torch.testing.assert_close(g_ld, g_dfl, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("family", "student"), [("retina", "gfl_tiny"), ("fcos", "gfl_tiny"), ("atss", "gfl_tiny"), ("atss", "retina_tiny")]
)
def test_distils_a_family_student_from_a_standard_teacher(tmp_path: Path, family: str, student: str):
    """A real run (``distill.train.run``) from each fixture, its classes renamed to the data set's digits: into a
    GFL student, and a one-anchor teacher into a nine-anchor RetinaNet student (the families' anchor rule)."""
    data = make_synthetic(tmp_path / "data", num_train=4, num_val=2, image_size=(128, 96), seed=3)
    spec = _spec_of(family)
    spec["meta"]["dataset_meta"]["classes"] = ["7", "2", "not-a-digit"]
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    make_checkpoint.write_checkpoint(tmp_path / "spec.json", tmp_path / "teacher.pth")
    job = LocalJobSpec.model_validate(
        {
            "kind": "distill",
            "dataset": str(data),
            "student": {"arch": student},
            "teacher": {"path": str(tmp_path / "teacher.pth")},
            "schedule": {"epochs": 1, "batch_size": 2, "image_size": [128, 96], "warmup_iters": 2, "num_workers": 0},
        }
    )
    metrics = run(job, tmp_path / "run")
    assert metrics["class_map"]["mapping"] == {"7": "7", "2": "2"} and metrics["class_map"]["by"] == "name"
    steps = [json.loads(line) for line in (tmp_path / "run" / "progress.jsonl").read_text().splitlines()]
    losses = [s["losses"] for s in steps if s["phase"] == "train" and s["losses"]]
    assert losses and all(math.isfinite(v) for step in losses for v in step.values())
    assert all(step["main_ld"] > 0 and step["main_kd"] > 0 for step in losses)


def test_uploaded_standard_checkpoint_is_described_and_teaches(checkpoints: dict[str, Path], tmp_path: Path):
    """``POST /v1/checkpoints`` describes it through the torch-free reader; the one job check accepts it as the
    teacher of a GFL student (no bins to compare), and refuses CrossKD, which needs a distribution head."""
    store = Store(f"sqlite:///{tmp_path / 'ldd.db'}")
    settings = Settings(data_dir=tmp_path / "data")
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(checkpoints_routes.router)
    app.dependency_overrides[deps.get_store] = lambda: store
    app.dependency_overrides[deps.get_settings] = lambda: settings
    with TestClient(app) as http:
        with open(checkpoints["retina"], "rb") as f:
            answer = http.post("/v1/checkpoints", files={"file": ("retina.pth", f)})
    assert answer.status_code == 201, answer.text
    arch = answer.json()["arch"]
    assert (arch["kind"], arch["family"], arch["form"], arch["num_anchors"], arch["reg_max"]) == (
        "detector", "retina", "standard", 9, None,
    )  # fmt: skip
    (settings.datasets_dir / "ds_00000000000000aa").mkdir(parents=True)
    store.add_dataset("ds_00000000000000aa", "tiny", "datasets/ds_00000000000000aa", ["class_2", "x"], 3, 4,
                      {"train": 3}, [])  # fmt: skip
    job = {"kind": "distill", "dataset": "ds_00000000000000aa", "student": {"arch": "gfl_tiny"},
           "teacher": {"checkpoint": answer.json()["id"]}}  # fmt: skip
    checked = check_job(JobSpec.model_validate(job), store, settings)
    assert checked.teacher_facts is not None and checked.teacher_facts["form"] == "standard"
    with pytest.raises(JobRefused, match="CrossKD"):
        check_job(JobSpec.model_validate({**job, "distill": {"method": "crosskd"}}), store, settings)
    store.close()


def test_towers_with_conv_bias_and_the_input_normalisation(tmp_path: Path):
    # FCOS's "tricks" configs set conv_bias=True: the GN towers' convs keep their biases.
    spec = _spec_of("fcos")
    bias_keys = [[f"bbox_head.{t}_convs.{i}.conv.bias", [64]] for t in ("cls", "reg") for i in range(2)]
    spec["keys_shapes"] += bias_keys
    spec["meta"]["cfg"] = spec["meta"]["cfg"].replace("type='FCOSHead'", "conv_bias=True, type='FCOSHead'")
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    make_checkpoint.write_checkpoint(tmp_path / "spec.json", tmp_path / "fcos.pth")
    model = load_detector(tmp_path / "fcos.pth")
    assert isinstance(model, StandardDetector) and model.info["options"]["tower_bias"]
    state = torch.load(tmp_path / "fcos.pth", weights_only=True)["state_dict"]
    torch.testing.assert_close(model.bbox_head.reg_convs[1].conv.bias, state["bbox_head.reg_convs.1.conv.bias"])
    # Our pipeline's RGB images, (pixel - MEAN) / STD, become the caffe model's BGR pixel - its mean.
    pixels = torch.rand(1, 3, 4, 5) * 255
    ours = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    caffe_mean = torch.tensor([102.9801, 115.9465, 122.7717]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.adapt_input(ours), pixels.flip(1) - caffe_mean, atol=1e-3, rtol=1e-5)
    # mmdetection 2.x says it with img_norm_cfg.
    text = "img_norm_cfg = dict(mean=[1.0, 2.0, 3.0], std=[4.0, 5.0, 6.0], to_rgb=False)\nmodel = dict(type='FCOS')"
    info = describe_checkpoint(_write(tmp_path, "fcos", cfg=text, key="config"))
    assert info["options"]["input"] == {"mean": [1.0, 2.0, 3.0], "std": [4.0, 5.0, 6.0], "rgb": False}


def test_spread_teacher_predicts_with_its_own_boxes(checkpoints: dict[str, Path]):
    """A job's teacher AP is the teacher's: boxes as mmdetection decodes them, not clipped to the student's bins."""
    standard = load_detector(checkpoints["retina"])
    assert isinstance(standard, StandardDetector)
    teacher = SpreadTeacher(standard, reg_max=16)
    torch.manual_seed(0)
    images = torch.randn(1, 3, 96, 128)
    (found,) = teacher.predict(images)
    (clipped,) = Detector.predict(teacher, images)  # the spread's boxes: this random teacher's exceed the bins
    assert not torch.equal(clipped["boxes"][0], found["boxes"][0])
    with torch.no_grad():
        boxes, scores, _ = standard.decode(*standard.raw_outputs(standard.adapt_input(images)))
    best = scores[0].amax(-1).argmax()
    assert len(found["boxes"]) > 0
    torch.testing.assert_close(found["scores"][0], scores[0].amax(-1)[best])
    h, w = images.shape[-2:]
    expected = torch.stack([boxes[0, best, 0].clamp(0, w), boxes[0, best, 1].clamp(0, h),
                            boxes[0, best, 2].clamp(0, w), boxes[0, best, 3].clamp(0, h)])  # fmt: skip
    torch.testing.assert_close(found["boxes"][0], expected)

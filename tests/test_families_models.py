"""The detector families (DESIGN section 2, issue 18): each family's head outputs, anchors, decoding,
CrossKD tower split, checkpoints and initialisation across families. Tiny models, 64x96 images."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from distill.checkpoint import atomic_save, build_detector, detector_state, infer_config, load_detector
from distill.ckpt_layout import describe_checkpoint, infer_architecture
from distill.init import initialise
from distill.locations import retina_anchor_sizes
from distill.models.gfl import GFL
from distill.spec import ARCHITECTURES, FAMILIES, NUM_ANCHORS, InitPath, StudentSpec, arch_family

C, R = 3, 16
QUALITY = {"gfl": False, "gflv2": True, "atss": True, "fcos": True, "retina": False}
# (H, W) of P3..P7 for a 64x96 input.
SIZES = [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]


def model_of(family: str, seed: int = 0) -> GFL:
    """A ``<family>_tiny`` whose predictors are perturbed so scores and boxes vary over locations."""
    torch.manual_seed(seed)
    model = build_detector(f"{family}_tiny", C, ["a", "b", "c"]).eval()
    with torch.no_grad():
        model.bbox_head.cls_out.weight.normal_(0, 0.2)
        model.bbox_head.cls_out.bias.fill_(-1.0)
        model.bbox_head.reg_out.weight.normal_(0, 0.2)
        for p in model.bbox_head.parameters():
            if p.dim() == 4 and p.shape[2:] == (1, 1):
                p.normal_(0, 0.3)  # GFocalV2's DGQP, else ~0 at init
    return model


def images(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 64, 96, generator=torch.Generator().manual_seed(1))


def test_every_family_in_every_size_and_the_spec_accepts_them():
    assert FAMILIES == ("gfl", "gflv2", "atss", "fcos", "retina")
    for family in FAMILIES:
        for size in ("tiny", "small", "r18", "r34", "r50", "r101"):
            arch = f"{family}_{size}"
            assert arch in ARCHITECTURES and arch_family(arch) == family
            assert StudentSpec(arch=arch).arch == arch
    assert arch_family("gfl_r18_w64_c256") == "gfl"
    with pytest.raises(ValueError, match="no detector family"):
        arch_family("yolo_r18")
    with pytest.raises(ValueError, match="unknown architecture"):
        StudentSpec(arch="yolo_r18")
    assert StudentSpec(arch="retina_r50", init="imagenet").pretrained


@pytest.mark.parametrize("family", FAMILIES)
def test_head_output_shapes(family):
    model = model_of(family)
    a = NUM_ANCHORS[family]
    assert (model.family, model.num_anchors, model.has_quality) == (family, a, QUALITY[family])
    outs = model.raw_outputs(images())
    assert len(outs) == (3 if QUALITY[family] else 2)
    for level, (h, w) in enumerate(SIZES):
        assert outs[0][level].shape == (2, a * C, h, w)
        assert outs[1][level].shape == (2, a * 4 * (R + 1), h, w) and outs[1][level].dtype == torch.float32
        if QUALITY[family]:
            assert outs[2][level].shape == (2, a, h, w)
    cls, reg = model.flatten(outs[0], outs[1])
    total = sum(h * w for h, w in SIZES) * a
    assert cls.shape == (2, total, C) and reg.shape == (2, total, 4, R + 1)
    points, strides, counts = model.locations(outs[0])
    assert points.shape == (total, 2) and strides.shape == (total,)
    assert counts == [h * w * a for h, w in SIZES]
    assert model.anchors(points, strides).shape == (total, 4)
    # Anchor-minor order: the a-th anchor of cell (y, x) of P3 sits at index (y * W + x) * A + a.
    y, x, k = 3, 5, a - 1
    i = (y * 12 + x) * a + k
    assert points[i].tolist() == [x * 8.0, y * 8.0] and strides[i] == 8
    assert torch.equal(cls[1, i], outs[0][0][1, k * C : (k + 1) * C, y, x])
    assert torch.equal(reg[1, i].reshape(-1), outs[1][0][1, k * 4 * (R + 1) : (k + 1) * 4 * (R + 1), y, x])
    if QUALITY[family]:
        assert model.flatten_quality(outs[2]).shape == (2, total)
        assert model.flatten_quality(outs[2])[1, i] == outs[2][0][1, k, y, x]


def test_retina_anchors_match_mmdetections_anchor_generator_worked_by_hand():
    """mmdetection's AnchorGenerator(octave_base_scale=4, scales_per_octave=3, ratios=[0.5, 1, 2], strides
    8..128, center_offset=0): at stride 8, base side 32 x 2^(i/3); ratio r = h/w gives w = side/sqrt(r),
    h = side*sqrt(r); order ratio-major, scale-minor; the anchors of cell (x, y) are shifted by
    (8x, 8y)."""
    side = [32.0, 32.0 * 2 ** (1 / 3), 32.0 * 2 ** (2 / 3)]  # 32, 40.32, 50.80
    expected = []
    for r in (0.5, 1.0, 2.0):
        for s in side:
            w, h = s / math.sqrt(r), s * math.sqrt(r)
            expected.append([16 - w / 2, 8 - h / 2, 16 + w / 2, 8 + h / 2])  # cell x=2, y=1: centre (16, 8)
    assert expected[0] == pytest.approx([16 - 22.627, 8 - 11.314, 16 + 22.627, 8 + 11.314], abs=1e-3)
    model = model_of("retina")
    points, strides, _ = model.locations(model.raw_outputs(images(1))[0])
    anchors = model.anchors(points, strides)
    first = (1 * 12 + 2) * 9
    assert torch.allclose(anchors[first : first + 9], torch.tensor(expected), atol=1e-4)
    # At P4 (stride 16) the same shapes twice as large: the first P4 cell starts after P3's 96 x 9 anchors.
    at_p4 = torch.tensor([[2 * v for v in e] for e in _at(expected, 16, 8)])
    assert torch.allclose(anchors[96 * 9 : 96 * 9 + 9], at_p4, atol=1e-4)
    assert retina_anchor_sizes().shape == (9, 2)


def _at(anchors: list[list[float]], cx: float, cy: float) -> list[list[float]]:
    """``anchors`` moved from centre (cx, cy) to the origin."""
    return [[a[0] - cx, a[1] - cy, a[2] - cx, a[3] - cy] for a in anchors]


@pytest.mark.parametrize("family", ["gfl", "fcos"])
def test_one_anchor_families_have_one_square_anchor_of_8_strides(family):
    model = model_of(family)
    points, strides, _ = model.locations(model.raw_outputs(images(1))[0])
    anchors = model.anchors(points, strides)
    assert anchors[13].tolist() == [8 - 32.0, 8 - 32.0, 8 + 32.0, 8 + 32.0]  # cell (1, 1) of P3


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_worked_by_hand_and_predict_agrees(family):
    model = model_of(family)
    x = images()
    with torch.no_grad():
        outs = model.raw_outputs(x)
        boxes, scores, counts = model.decode(*outs)
    a = model.num_anchors
    # One anchor of P4's cell (y=2, x=3): edges = integral of its distributions x 16 from the point (48, 32).
    y, xx, k = 2, 3, a // 2
    i = 96 * a + (y * 6 + xx) * a + k
    logits = outs[1][1][0, k * 4 * (R + 1) : (k + 1) * 4 * (R + 1), y, xx].reshape(4, R + 1)
    d = ((F.softmax(logits, -1) * torch.arange(R + 1.0)).sum(-1) * 16).tolist()
    assert boxes[0, i].tolist() == pytest.approx([48 - d[0], 32 - d[1], 48 + d[2], 32 + d[3]], abs=1e-4)
    want = outs[0][1][0, k * C : (k + 1) * C, y, xx].sigmoid()
    if QUALITY[family]:
        want = want * outs[2][1][0, k, y, xx].sigmoid()  # centerness / DGQP multiplied in
    assert scores[0, i].tolist() == pytest.approx(want.tolist(), abs=1e-6)
    dets = model.predict(x)
    assert len(dets[0]["scores"]) > 0
    best = scores[0].max()
    assert dets[0]["scores"][0] == pytest.approx(best.item())
    j = int(scores[0].max(1).values.argmax())
    clipped = boxes[0, j].clone()
    clipped[0::2], clipped[1::2] = clipped[0::2].clamp(0, 96), clipped[1::2].clamp(0, 64)
    assert dets[0]["boxes"][0].tolist() == pytest.approx(clipped.tolist(), abs=1e-4)


def test_gflv2_quality_is_the_dgqp_of_each_edges_top4_and_mean():
    model = model_of("gflv2")
    _, reg, quality = model.raw_outputs(images(1))
    logits = reg[0][0, :, 1, 2].reshape(4, R + 1)  # P3 cell (y=1, x=2)
    top = F.softmax(logits, -1).topk(4, -1).values
    stat = torch.cat([top, top.mean(-1, keepdim=True)], -1).reshape(20)  # per edge: 4 probabilities, mean
    conv1, conv2 = model.bbox_head.reg_conf[0], model.bbox_head.reg_conf[2]
    hidden = (conv1.weight[:, :, 0, 0] @ stat + conv1.bias).relu()
    assert quality[0][0, 0, 1, 2].item() == pytest.approx((conv2.weight[0, :, 0, 0] @ hidden + conv2.bias).item())


@pytest.mark.parametrize("family", FAMILIES)
def test_tower_split_reproduces_the_head(family):
    """CrossKD's split: ``from_tower`` on ``forward_tower``'s held features gives the head's own outputs."""
    model = model_of(family)
    feats = model.features(images(1))
    cls_scores, bbox_preds = model.bbox_head(feats)[:2]
    for k in (0, 1, 2):
        tc, tb, cls_feats, reg_feats = model.bbox_head.forward_tower(feats, k)
        for level in range(5):
            assert torch.allclose(tc[level], cls_scores[level], atol=1e-6)
            c, b = model.bbox_head.from_tower(cls_feats[level], reg_feats[level], k, level)
            assert torch.allclose(c, cls_scores[level], atol=1e-5)
            assert torch.allclose(b, bbox_preds[level], atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_round_trip_and_family_from_the_keys(family, tmp_path):
    model = model_of(family)
    path = tmp_path / "m.pt"
    atomic_save(detector_state(model, {"input_size": [96, 64]}), path)
    loaded = load_detector(path)
    assert loaded.family == family and loaded.arch == f"{family}_tiny" and loaded.classes == ["a", "b", "c"]
    x = images(1)
    for mine, theirs in zip(model.raw_outputs(x), loaded.raw_outputs(x), strict=True):
        assert all(torch.equal(p, q) for p, q in zip(mine, theirs, strict=True))
    info = describe_checkpoint(path)  # the API's torch-free reader
    assert (info["family"], info["name"], info["num_classes"], info["num_anchors"]) == (
        family, f"{family}_tiny", C, NUM_ANCHORS[family],
    )  # fmt: skip
    # Without a config (a bare state dict) the family is read off the head's key names.
    state = model.state_dict()
    assert infer_architecture(state)["family"] == family and infer_config(state).family == family
    bare = tmp_path / "bare.pt"
    torch.save({"state_dict": state}, bare)
    assert load_detector(bare).family == family and describe_checkpoint(bare)["name"] == f"{family}_tiny"


def test_a_checkpoint_saved_before_families_is_a_gfl(tmp_path):
    ckpt = detector_state(model_of("gfl"))
    del ckpt["config"]["family"]
    atomic_save(ckpt, tmp_path / "old.pt")
    assert load_detector(tmp_path / "old.pt").family == "gfl"
    assert describe_checkpoint(tmp_path / "old.pt")["family"] == "gfl"


def test_initialising_across_families_takes_the_shared_parts(tmp_path):
    """A RetinaNet student from a GFL checkpoint: backbone, FPN and towers load; its own predictors
    (``retina_cls``/``retina_reg``, other names and 9 anchors) start fresh."""
    teacher = model_of("gfl", seed=3)
    atomic_save(detector_state(teacher), tmp_path / "gfl.pt")
    student = build_detector("retina_tiny", C, ["a", "b", "c"])
    report = initialise(student, InitPath(path=str(tmp_path / "gfl.pt")))
    assert torch.equal(student.neck.fpn_convs[0].conv.weight, teacher.neck.fpn_convs[0].conv.weight)
    assert torch.equal(student.bbox_head.reg_convs[1].conv.weight, teacher.bbox_head.reg_convs[1].conv.weight)
    assert {"bbox_head.retina_cls.weight", "bbox_head.retina_reg.weight"} <= set(report.fresh)
    assert not any(k.startswith(("backbone.", "neck.")) for k in report.fresh if not k.endswith("tracked"))


def test_every_entry_point_lists_the_families(capsys):
    """The API schema (enum and description of the student's arch), the CLI's help and the web UI's study form."""
    from api.cli import build_parser

    arch = StudentSpec.model_json_schema()["properties"]["arch"]
    assert arch["enum"] == list(ARCHITECTURES) and all(f in arch["description"] for f in FAMILIES)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["jobs", "submit", "--help"])
    help_text = capsys.readouterr().out
    assert all(f in help_text for f in ("gflv2", "atss", "fcos", "retina")), help_text
    ui = (Path(__file__).resolve().parents[1] / "api/static/js/studies.js").read_text()
    assert 'const FAMILIES = ["gfl", "gflv2", "atss", "fcos", "retina"];' in ui
    assert 'const SIZES = ["tiny", "small", "r18", "r34", "r50", "r101"];' in ui


@pytest.mark.parametrize("family", ["retina", "fcos"])
def test_imagenet_init_for_every_family(tmp_path, family):
    """``init: "imagenet"`` is the ResNet's, whatever the head: torchvision's file fills the backbone."""
    from tests.test_init import _random_resnet_file

    expected = _random_resnet_file(tmp_path / "weights", 18)
    spec = StudentSpec(arch=f"{family}_r18", init="imagenet")
    model = build_detector(spec.arch, 2, frozen_stages=spec.backbone_frozen_stages, norm_eval=spec.backbone_norm_eval)
    report = initialise(model, spec.init, weights_dir=tmp_path / "weights")
    assert torch.equal(model.backbone.layer4[1].conv2.weight, expected["layer4.1.conv2.weight"])
    assert report.source == "imagenet:resnet18" and f"bbox_head.{model.bbox_head.cls_name}.weight" in report.fresh

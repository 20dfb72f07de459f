"""Every detector family exported to ONNX with its own post-processing (A anchors, centerness, DGQP quality)
in fp32, fp16 and int8, checked against PyTorch, served torch-free by ONNX Runtime and OpenVINO, and a graph
whose structure does not depend on the weights (issue 18). One export per family (~5 s on a 2-core CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from deploy.export import compare_detections, export_model, export_onnx, graph_stats, sample_images
from deploy.runtime import Predictor, prepare_batch
from distill.checkpoint import atomic_save, build_detector, detector_state, load_detector
from distill.ckpt_layout import PREDICTORS, QUALITY_LAYERS
from distill.spec import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "emu"]
INPUT_SIZE = (160, 128)


def perturbed(family: str, seed: int = 0):
    """``<family>_tiny`` with weights that give a few dozen detections on the sample pictures (a fresh
    head scores every anchor ~0.01, below the 0.05 threshold). Not many more: with thousands of candidates
    above the threshold (RetinaNet's nine anchors, boxes clipped to the same image corner) fp16's rounding
    flips more NMS decisions than the 5% its verification allows."""
    torch.manual_seed(seed)
    model = build_detector(f"{family}_tiny", len(CLASSES), CLASSES).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.bbox_head.cls_out.weight.normal_(0, 0.1)
        model.bbox_head.reg_out.weight.normal_(0, 0.05)
        model.bbox_head.cls_out.bias.fill_(-4.5)
    return model


# gfl's export is tests/test_deploy_export.py's and tests/test_backends.py's subject.
@pytest.fixture(scope="module", params=[f for f in FAMILIES if f != "gfl"])
def exported(request, tmp_path_factory):
    family = request.param
    tmp = tmp_path_factory.mktemp(f"export_{family}")
    ckpt = tmp / "model.pt"
    atomic_save(detector_state(perturbed(family), {"input_size": list(INPUT_SIZE)}), ckpt)
    # The export itself refuses to finish unless ONNX Runtime reproduces PyTorch (fp32, and fp16 to its
    # tolerances); the tests below check that again from outside.
    info = export_model(ckpt, tmp / "model", formats=["fp32", "fp16", "int8"])
    return {"family": family, "ckpt": ckpt, "dir": tmp / "model", "info": info, "model": load_detector(ckpt)}


def _matches(expected_runs, got_runs, sizes, box_tol=1e-3, score_tol=1e-4) -> int:
    """Compare two runs' padded outputs image by image; returns the matched detections (asserts none is off)."""
    total = 0
    for i in range(len(sizes)):
        exp, got = (
            {"boxes": r[0][i, : int(r[3][i])], "scores": r[1][i, : int(r[3][i])], "labels": r[2][i, : int(r[3][i])]}
            for r in (expected_runs, got_runs)
        )
        result = compare_detections(
            exp, got, tuple(sizes[i]), box_tol=box_tol, score_tol=score_tol, score_thr=0.05, max_dets=100
        )
        assert result["problems"] == [], result["problems"][:3]
        total += result["matched"]
    return total


def test_fp32_graph_reproduces_pytorch(exported):
    model, predictor = exported["model"], Predictor(exported["dir"], backend="onnxruntime")
    assert exported["info"]["arch"] == f"{exported['family']}_tiny"
    assert exported["info"]["export"]["family"] == exported["family"]
    total = 0
    for images in (sample_images(seed=3), sample_images(seed=5)[:1]):  # a padded batch of three, and one
        batch, sizes, _ = prepare_batch(images, INPUT_SIZE)
        with torch.no_grad():
            dets = model.predict(torch.from_numpy(batch), [(int(h), int(w)) for h, w in sizes])
        torch_runs = (
            np.stack([np.pad(d["boxes"].numpy(), ((0, 100 - len(d["boxes"])), (0, 0))) for d in dets]),
            np.stack([np.pad(d["scores"].numpy(), (0, 100 - len(d["scores"]))) for d in dets]),
            np.stack([np.pad(d["labels"].numpy(), (0, 100 - len(d["labels"]))) for d in dets]),
            np.array([len(d["scores"]) for d in dets]),
        )
        total += _matches(torch_runs, predictor.run(batch, sizes), sizes)
    assert total > 10


def test_fp16_and_int8_run_on_onnx_runtime(exported):
    family, info = exported["family"], exported["info"]
    assert set(info["variants"]) == {"fp16", "int8"}
    fp16 = info["variants"]["fp16"]["export"]["verification"]
    assert fp16["detections"] > 10 and fp16["unmatched"] <= 0.05 * fp16["detections"]
    int8 = info["variants"]["int8"]["export"]
    # The family's predictors and quality layer stay float; the rest of the network is quantized.
    assert set(int8["int8"]["float_convs"]) == {
        *PREDICTORS[family],
        *([QUALITY_LAYERS[family]] if family in QUALITY_LAYERS else []),
    }
    proto = onnx.load(str(exported["dir"] / "int8" / "model.onnx"))
    assert "QuantizeLinear" in {n.op_type for n in proto.graph.node}
    assert int8["verification"]["reference"] > 10 and int8["verification"]["matched"] > 0
    images = sample_images(seed=3)
    for fmt in ("fp16", "int8"):
        dets = Predictor(exported["dir"] / fmt, backend="onnxruntime").predict(images)
        assert len(dets) == 3 and sum(len(d) for d in dets) > 0
        assert all(d["class_name"] in CLASSES and 0.05 < d["score"] <= 1 for per in dets for d in per)


def test_openvino_predicts_what_onnx_runtime_predicts_on_the_fp32_graph(exported):
    pytest.importorskip("openvino")
    ov, ref = Predictor(exported["dir"], backend="openvino"), Predictor(exported["dir"], backend="onnxruntime")
    batch, sizes, _ = prepare_batch(sample_images(seed=4), INPUT_SIZE)
    assert _matches(ref.run(batch, sizes), ov.run(batch, sizes), sizes) > 10


def test_predict_without_torch(exported, tmp_path):
    """The runtime in a process where ``import torch`` fails gives the detections ONNX Runtime gives here."""
    image = tmp_path / "in.png"
    sample_images(seed=2)[0].save(image)
    code = (
        "import sys, json; sys.modules['torch'] = None\n"
        "from deploy.runtime import Predictor\n"
        f"print(json.dumps(Predictor({str(exported['dir'])!r}).predict([open({str(image)!r}, 'rb').read()])))\n"
        "assert not [m for m in sys.modules if m.split('.')[0] == 'torch' and sys.modules[m]]\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)[0]
    want = Predictor(exported["dir"]).predict([image.read_bytes()])[0]
    assert len(got) == len(want) > 0
    assert [d["label"] for d in got] == [d["label"] for d in want]
    assert np.allclose([d["box"] for d in got], [d["box"] for d in want], atol=1e-3)


def test_graph_structure_does_not_depend_on_the_weights(exported, tmp_path):
    """A distilled student exports to the same graph as a plain one: a fresh model (equal initializers
    everywhere) against the perturbed one."""
    fresh = build_detector(f"{exported['family']}_tiny", len(CLASSES), CLASSES).eval()
    fresh_proto = export_onnx(fresh, tmp_path / "fresh.onnx")
    ours = onnx.load(str(exported["dir"] / "model.onnx"))
    assert graph_stats(fresh_proto) == graph_stats(ours) == exported["info"]["graph"]
    assert [n.op_type for n in fresh_proto.graph.node] == [n.op_type for n in ours.graph.node]
    assert [tuple(t.dims) for t in fresh_proto.graph.initializer] == [tuple(t.dims) for t in ours.graph.initializer]

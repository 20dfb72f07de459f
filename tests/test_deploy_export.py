"""ONNX export of the tiny detector, checked against PyTorch, and the torch-free predictor on it.

One export per module (a few seconds on a 2-core CPU); every test below reuses it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from deploy.export import (
    ExportError,
    compare_detections,
    export_onnx,
    graph_stats,
    sample_images,
    verify_onnx,
)
from deploy.registry import FORMAT, RUNTIME_KEYS, ModelIntegrityError, Registry, read_model_json
from deploy.runtime import ImageError, Predictor, prepare_batch
from distill.checkpoint import build_detector, detector_state, load_detector

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "emu"]
INPUT_SIZE = (320, 256)


def tiny_detector(seed: int = 0):
    """gfl_tiny with weights that give a few dozen detections of all three classes on the sample images
    (a freshly initialised head scores every location ~0.01, below the 0.05 threshold)."""
    torch.manual_seed(seed)
    model = build_detector("gfl_tiny", num_classes=3, classes=CLASSES).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        model.bbox_head.gfl_cls.weight.normal_(0, 0.1)
        model.bbox_head.gfl_reg.weight.normal_(0, 0.1)
        model.bbox_head.gfl_cls.bias.fill_(-4.5)
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    ckpt = tmp / "tiny.pt"
    torch.save(detector_state(tiny_detector(), {"input_size": list(INPUT_SIZE), "metrics": {"AP": 0.123}}), ckpt)
    out = tmp / "model"
    # Through the command line, as a user runs it: the model's description comes out as JSON.
    run = subprocess.run(
        [sys.executable, "-m", "deploy", "export", str(ckpt), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    info = json.loads(run.stdout)
    assert info["out_dir"] == str(out) and info["sha256"] == read_model_json(out)["sha256"]
    return {"ckpt": ckpt, "dir": out, "info": info, "model": load_detector(ckpt)}


def _torch_dets(model, batch, sizes):
    with torch.no_grad():
        dets = model.predict(torch.from_numpy(batch), [(int(h), int(w)) for h, w in sizes])
    return [{k: v.numpy() for k, v in d.items()} for d in dets]


def test_export_writes_a_checked_described_model(exported):
    info, folder = exported["info"], exported["dir"]
    assert sorted(p.name for p in folder.iterdir()) == ["model.json", "model.onnx"]  # no temporary left over
    proto = onnx.load(str(folder / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert "NonMaxSuppression" in {n.op_type for n in proto.graph.node}
    assert [i.name for i in proto.graph.input] == ["images", "image_sizes"]
    assert [o.name for o in proto.graph.output] == ["boxes", "scores", "labels", "num_detections"]
    dims = [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))  # N, H, W dynamic
    assert info["arch"] == "gfl_tiny" and info["classes"] == CLASSES and info["input_size"] == list(INPUT_SIZE)
    assert info["metrics"] == {"AP": 0.123}  # the checkpoint's
    assert len(info["sha256"]) == 64 and info["format"] == "fp32" and info["variants"] == {}
    assert info["export"]["exporter"] == "torchscript" and info["accuracy_warning"] is None
    # The folder keeps what the runtime needs; the rest of the description is the caller's to keep.
    runtime = read_model_json(folder)
    # model.json's "format" is its schema tag; the description's is the precision (fp32, int8, fp16).
    assert set(runtime) <= set(RUNTIME_KEYS) and runtime == {**{k: info[k] for k in runtime}, "format": FORMAT}
    assert runtime["mean"] and runtime["std"] and "export" not in runtime and "metrics" not in runtime
    # The export's own check compared real detections, not empty lists.
    assert info["export"]["verification"]["detections"] > 50


@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize("input_size", [(320, 256), (480, 416)])
def test_onnx_runtime_reproduces_pytorch(exported, batch_size, input_size):
    session = ort.InferenceSession(str(exported["dir"] / "model.onnx"), providers=["CPUExecutionProvider"])
    images = sample_images(seed=7)[:batch_size]
    batch, sizes, _ = prepare_batch(images, input_size)
    assert batch.shape[0] == batch_size and batch.shape[2] % 32 == 0 and batch.shape[3] % 32 == 0
    boxes, scores, labels, num = session.run(None, {"images": batch, "image_sizes": sizes})
    assert boxes.shape == (batch_size, 100, 4) and scores.shape == labels.shape == (batch_size, 100)
    expected = _torch_dets(exported["model"], batch, sizes)
    total = 0
    for i, exp in enumerate(expected):
        k = int(num[i])
        got = {"boxes": boxes[i, :k], "scores": scores[i, :k], "labels": labels[i, :k]}
        result = compare_detections(
            exp, got, tuple(sizes[i]), box_tol=1e-3, score_tol=1e-4, score_thr=0.05, max_dets=100
        )
        assert result["problems"] == []
        assert result["matched"] == len(exp["scores"]) == k  # nothing excused as borderline here
        assert (labels[i, k:] == -1).all() and (scores[i, k:] == 0).all() and (boxes[i, k:] == 0).all()
        assert (np.diff(scores[i, :k]) <= 0).all()
        total += k
    assert total > 0
    assert len({int(v) for v in labels[labels >= 0]}) > 1


def test_verification_fails_for_a_graph_that_does_not_match(exported):
    other = tiny_detector(seed=1)  # same architecture, different weights
    with pytest.raises(ExportError, match="does not reproduce PyTorch"):
        verify_onnx(exported["dir"] / "model.onnx", other, sample_images(), INPUT_SIZE)


def test_predictor_returns_detections_in_original_pixels(exported):
    predictor = Predictor(exported["dir"], providers=["CPUExecutionProvider"], intra_op_threads=1)
    assert predictor.classes == CLASSES and predictor.providers == ["CPUExecutionProvider"]
    images = sample_images(seed=3)
    # Mixed inputs: encoded PNG bytes, a PIL image, an array; different sizes, one session call.
    buf = io.BytesIO()
    images[0].save(buf, format="PNG")
    inputs = [buf.getvalue(), images[1], np.asarray(images[2])]
    results = predictor.predict(inputs)
    batch, sizes, factors = prepare_batch(images, predictor.input_size)
    expected = _torch_dets(exported["model"], batch, sizes)
    assert len(results) == 3 and sum(map(len, results)) > 0
    for image, dets, exp, (sx, sy) in zip(images, results, expected, factors, strict=True):
        assert len(dets) == len(exp["scores"])
        for det in dets:
            assert set(det) == {"box", "score", "label", "class_name"}
            assert det["class_name"] == CLASSES[det["label"]]
            x1, y1, x2, y2 = det["box"]
            assert 0 <= x1 <= x2 <= image.width and 0 <= y1 <= y2 <= image.height
        got = {
            "boxes": np.array([d["box"] for d in dets]).reshape(-1, 4),
            "scores": np.array([d["score"] for d in dets]),
            "labels": np.array([d["label"] for d in dets]),
        }
        want = {**exp, "boxes": exp["boxes"] / np.array([sx, sy, sx, sy])}  # resized -> original pixels
        result = compare_detections(
            want, got, (image.height, image.width), box_tol=1e-3, score_tol=1e-4, score_thr=0.05, max_dets=100
        )
        assert result["problems"] == [] and result["matched"] == len(dets)


def test_exif_orientation_is_applied(exported):
    predictor = Predictor(exported["dir"])
    image = sample_images(seed=5)[0]  # 320 x 240
    stored = image.transpose(Image.Transpose.ROTATE_270)  # pixels as a camera held sideways stores them...
    exif = Image.Exif()
    exif[0x0112] = 8  # ...and the EXIF orientation that says how to turn them upright
    buf = io.BytesIO()
    stored.save(buf, format="PNG", exif=exif.tobytes())
    upright, from_exif = predictor.predict([image, buf.getvalue()])
    assert len(upright) > 0 and len(upright) == len(from_exif)
    for a, b in zip(upright, from_exif, strict=True):
        assert a["label"] == b["label"] and np.allclose(a["box"], b["box"], atol=0.5)


def test_predictor_refuses_bad_images(exported):
    predictor = Predictor(exported["dir"], max_pixels=1_000_000)
    good = io.BytesIO()
    sample_images()[0].save(good, format="JPEG")
    with pytest.raises(ImageError, match="image 1: not a decodable image"):
        predictor.predict([good.getvalue(), b"definitely not an image"])
    with pytest.raises(ImageError, match="image 0: .*exceeds the limit of 1000000"):
        predictor.predict([Image.new("RGB", (1001, 1000))])
    with pytest.raises(ImageError, match="truncated"):
        predictor.predict([good.getvalue()[: len(good.getvalue()) // 2]])


def test_tampered_model_is_refused(exported, tmp_path):
    folder = tmp_path / "m"
    shutil.copytree(exported["dir"], folder)
    Predictor(folder)  # intact: loads
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in a weight: still a valid graph, but not the exported one
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="sha256"):
        Predictor(folder)
    registry = Registry(tmp_path / "registry")
    with pytest.raises(ModelIntegrityError):
        registry.publish(folder)
    assert registry.list() == []


def test_cli_predict_and_draw_without_torch(exported, tmp_path):
    """``python -m deploy predict`` in a process where ``import torch`` fails: JSON out, a drawn image."""
    image = tmp_path / "in.jpg"
    sample_images(seed=2)[0].save(image)
    code = (
        "import sys, runpy; sys.modules['torch'] = None; sys.argv = ['deploy'] + sys.argv[1:]; "
        "runpy.run_module('deploy', run_name='__main__')"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", code, "predict", str(exported["dir"]), str(image), "--draw", str(tmp_path / "out.png")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result[0]["image"] == str(image) and len(result[0]["detections"]) > 0
    with Image.open(tmp_path / "out.png") as drawn:
        assert drawn.size == Image.open(image).size
        assert np.abs(np.asarray(drawn, dtype=int) - np.asarray(Image.open(image), dtype=int)).max() > 100
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"")
    out = subprocess.run(
        [sys.executable, "-c", code, "predict", str(exported["dir"]), str(bad)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert out.returncode == 2 and "empty file" in out.stderr


@pytest.mark.slow
def test_graph_structure_does_not_depend_on_the_weights(exported, tmp_path):
    """A distilled student must export to the same graph as an undistilled one: a fresh model (every level
    scale 1, every norm weight 1, every bias 0, so many equal initializers) against the perturbed one."""
    fresh = build_detector("gfl_tiny", num_classes=3, classes=CLASSES).eval()
    fresh_proto = export_onnx(fresh, tmp_path / "fresh.onnx")
    ours = onnx.load(str(exported["dir"] / "model.onnx"))
    assert graph_stats(fresh_proto) == graph_stats(ours) == exported["info"]["graph"]
    assert [n.op_type for n in fresh_proto.graph.node] == [n.op_type for n in ours.graph.node]
    assert [tuple(t.dims) for t in fresh_proto.graph.initializer] == [tuple(t.dims) for t in ours.graph.initializer]

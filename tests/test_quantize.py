"""int8 and fp16 exports of the tiny detector: detections against fp32, the AP each format's runtime measures,
and the accuracy warning of an int8 model calibrated on the wrong pictures.

The data set is made so that fp32 is right by construction: its ground truth is the PyTorch detector's own
confident detections on varied pictures. fp32 then scores an AP near 100, and what int8 and fp16 lose is
what their precision costs, measured as the service measures it (``deploy.evaluate``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from deploy.export import AP_WARNING, export_model
from deploy.quantize import CHAIN_SCOPES, DECODE_SCOPES, NETWORK_SCOPES, OUTPUT_CONVS
from deploy.runtime import Predictor, prepare_batch
from deploy.verify import compare_detections, sample_images
from distill.checkpoint import detector_state
from tests.test_deploy_export import CLASSES, INPUT_SIZE, tiny_detector

# int8 against fp32 on the same pictures: 80% of fp32's detections of score >= 0.3 must be found again with
# the same label, box corners within 10% of the image side, score within 0.15. That is loose: the test
# model's weights are random, which 8-bit activation ranges fit coarsely (it loses ~20 AP against its own
# detections here); the benchmark measures what int8 costs a trained model (bench/latency.py).
INT8_BOX_TOL, INT8_SCORE_TOL, INT8_MIN_SCORE, INT8_FOUND = 0.10, 0.15, 0.3, 0.8
# fp16 against fp32: half precision moves a score by ~1e-3.
FP16_BOX_TOL, FP16_SCORE_TOL = 1e-2, 1e-2


def confident_detector():
    """The tiny test detector with a head that scores a fifth of its detections above 0.3."""
    model = tiny_detector()
    with torch.no_grad():
        model.bbox_head.gfl_cls.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
        model.bbox_head.gfl_cls.bias.fill_(-4.0)
    return model


def make_dataset(folder: Path, model, n_train: int = 6, n_val: int = 6) -> Path:
    """Pictures with the PyTorch model's own detections above 0.3 as ground truth (COCO, with splits)."""
    (folder / "images").mkdir(parents=True)
    images, annotations = [], []
    pictures = [im for seed in range(10, 10 + (n_train + n_val + 2) // 3) for im in sample_images(seed=seed)]
    for i, picture in enumerate(pictures[: n_train + n_val]):
        name = f"images/{i:03d}.png"
        picture.save(folder / name)
        images.append(
            {
                "id": i + 1,
                "file_name": name,
                "width": picture.width,
                "height": picture.height,
                "split": "train" if i < n_train else "val",
            }
        )
        batch, sizes, ((sx, sy),) = prepare_batch([picture], INPUT_SIZE)
        with torch.no_grad():
            det = model.predict(torch.from_numpy(batch), [tuple(int(v) for v in sizes[0])])[0]
        for box, score, label in zip(det["boxes"].numpy(), det["scores"].numpy(), det["labels"].numpy(), strict=True):
            if score < 0.3:
                continue
            x1, y1, x2, y2 = (float(v) for v in box / np.array([sx, sy, sx, sy]))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": int(label) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
    assert len(annotations) > 20
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": c} for i, c in enumerate(CLASSES)],
    }
    (folder / "annotations.json").write_text(json.dumps(coco))
    return folder


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("formats")
    model = confident_detector()
    ckpt = tmp / "tiny.pt"
    torch.save(detector_state(model, {"input_size": list(INPUT_SIZE)}), ckpt)
    dataset = make_dataset(tmp / "data", model)
    info = export_model(ckpt, tmp / "out", formats=["fp16", "int8"], dataset=dataset)
    return {"ckpt": ckpt, "dir": tmp / "out", "info": info, "dataset": dataset}


def _detections(folder: Path, pictures: list[Image.Image]) -> list[dict[str, np.ndarray]]:
    out = []
    for dets in Predictor(folder).predict(pictures):
        out.append(
            {
                "boxes": np.array([d["box"] for d in dets]).reshape(-1, 4),
                "scores": np.array([d["score"] for d in dets]),
                "labels": np.array([d["label"] for d in dets]),
            }
        )
    return out


def test_formats_are_written_beside_fp32_and_described(formats):
    info, out = formats["info"], formats["dir"]
    assert sorted(p.name for p in out.iterdir()) == ["fp16", "int8", "model.json", "model.onnx"]
    assert set(info["variants"]) == {"int8", "fp16"} and info["format"] == "fp32"
    for fmt, variant in info["variants"].items():
        assert variant["format"] == fmt and variant["dir"] == fmt
        assert sorted(p.name for p in (out / fmt).iterdir()) == ["model.json", "model.onnx"]
        assert variant["classes"] == CLASSES and variant["input_size"] == list(INPUT_SIZE)
    int8 = onnx.load(str(out / "int8" / "model.onnx"))
    ops = {n.op_type for n in int8.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "NonMaxSuppression"} <= ops
    # Per-channel weights: the scale of a conv weight's DequantizeLinear is a vector (one per output channel).
    inits = {t.name: t for t in int8.graph.initializer}
    weight_scales = [
        inits[n.input[1]]
        for n in int8.graph.node
        if n.op_type == "DequantizeLinear"
        and n.input[0] in inits
        and inits[n.input[0]].data_type == onnx.TensorProto.INT8
    ]
    assert weight_scales and all(len(s.dims) == 1 and s.dims[0] > 1 for s in weight_scales)
    # 7-bit weights: on CPUs without VNNI a u8 x s8 pair sum, 2 x 255 x |w|, must fit vpmaddubsw's int16 (32767).
    weights = [onnx.numpy_helper.to_array(t) for t in inits.values() if t.data_type == onnx.TensorProto.INT8]
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64
    assert info["variants"]["int8"]["export"]["int8"]["weights"] == "int8 per channel, 7-bit range"
    # Post-processing stays float: no quantized tensor feeds the NMS or the outputs.
    assert all(not n.name.startswith("/bbox_head/integral") for n in int8.graph.node if n.op_type == "QuantizeLinear")
    calib = info["variants"]["int8"]["export"]["int8"]["calibration"]
    assert calib["source"] == "training split" and calib["images"] == 6
    fp16 = onnx.load(str(out / "fp16" / "model.onnx"))
    weights = [t for t in fp16.graph.initializer if len(t.dims) == 4]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert info["variants"]["fp16"]["size_bytes"] < 0.6 * info["size_bytes"]
    assert info["variants"]["fp16"]["export"]["verification"]["detections"] > 20  # checked against PyTorch


def test_int8_keeps_the_backbone_and_fpn_additions_in_integers(formats, tmp_path):
    # Backbone and FPN additions read quantized tensors (a DequantizeLinear feeds each input), so ONNX Runtime
    # runs them as QLinearAdd; the head's GroupNorm additions, its output convolutions and the decoding stay
    # float (deploy.quantize says why).
    int8 = onnx.load(str(formats["dir"] / "int8" / "model.onnx"))
    producer = {out: n.op_type for n in int8.graph.node for out in n.output}  # initializers: none
    adds = [
        n
        for n in int8.graph.node
        if n.op_type == "Add" and n.name.startswith(NETWORK_SCOPES) and not n.name.startswith(DECODE_SCOPES)
    ]
    quantized = {n.name for n in adds if all(producer.get(i) == "DequantizeLinear" for i in n.input)}
    chain = {n.name for n in adds if n.name.startswith(CHAIN_SCOPES)}
    assert chain and quantized == chain, sorted(quantized ^ chain)
    assert any(n.name.startswith("/bbox_head/") for n in adds)  # the GroupNorm ones, left float
    output_convs = [n for n in int8.graph.node if n.op_type == "Conv" and n.name.startswith(OUTPUT_CONVS)]
    assert output_convs and all(producer.get(n.input[1]) != "DequantizeLinear" for n in output_convs)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(formats["dir"] / "int8" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert {"QLinearConv", "QLinearAdd"} <= fused


def test_int8_and_fp16_detections_agree_with_fp32(formats):
    pictures = sample_images(seed=3)
    fp32 = _detections(formats["dir"], pictures)
    for fmt, box_tol, score_tol in (("int8", INT8_BOX_TOL, INT8_SCORE_TOL), ("fp16", FP16_BOX_TOL, FP16_SCORE_TOL)):
        got = _detections(formats["dir"] / fmt, pictures)
        matched = total = 0
        for picture, exp, dets in zip(pictures, fp32, got, strict=True):
            keep = exp["scores"] >= INT8_MIN_SCORE
            confident = {k: v[keep] for k, v in exp.items()}
            r = compare_detections(
                confident,
                dets,
                (picture.height, picture.width),
                box_tol=box_tol,
                score_tol=score_tol,
                score_thr=0.0,
                max_dets=10**6,
            )
            matched, total = matched + r["matched"], total + r["expected"]
        assert total > 10
        # fp16: every confident detection; int8: INT8_FOUND of them.
        assert matched >= (total if fmt == "fp16" else INT8_FOUND * total), (fmt, matched, total)


def test_each_format_carries_the_ap_its_runtime_measured(formats):
    info = formats["info"]
    fp32 = info["metrics"]
    assert fp32["backend"] == "onnxruntime" and fp32["providers"] == ["CPUExecutionProvider"] and fp32["images"] == 6
    assert fp32["AP"] > 0.9  # ground truth = the model's own confident detections
    for fmt in ("int8", "fp16"):
        ap = info["variants"][fmt]["metrics"]
        assert set(ap) >= {"AP", "AP50", "AP75", "backend", "providers", "images"}
        drop = 100 * (fp32["AP"] - ap["AP"])
        warning = info["variants"][fmt]["accuracy_warning"]
        assert (warning is not None) == (drop > AP_WARNING), (fmt, drop, warning)
    assert abs(info["variants"]["fp16"]["metrics"]["AP"] - fp32["AP"]) < 0.01
    assert info["accuracy_warning"] is None


def test_int8_calibrated_on_the_wrong_pictures_is_published_with_a_warning(formats, tmp_path):
    # Flat grey pictures: every activation range collapses to almost nothing, so real pictures saturate.
    grey = [Image.new("RGB", (320, 256), (124, 116, 104)) for _ in range(4)]
    info = export_model(
        formats["ckpt"], tmp_path / "bad", formats=["int8"], dataset=formats["dataset"], calibration=grey
    )
    variant = info["variants"]["int8"]
    assert variant["export"]["int8"]["calibration"] == {"source": "given pictures", "images": 4}
    warning = variant["accuracy_warning"]
    assert warning is not None and warning["format"] == "int8" and warning["threshold_points"] == AP_WARNING
    assert warning["fp32_AP"] == info["metrics"]["AP"] and warning["AP"] == variant["metrics"]["AP"]
    assert warning["drop_points"] > AP_WARNING and "int8 loses" in warning["message"]
    assert (tmp_path / "bad" / "int8" / "model.onnx").is_file()  # still exported (the service publishes it)


def test_cli_exports_formats_and_says_where_calibration_came_from(formats, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-m", "deploy", "export", str(formats["ckpt"]), str(tmp_path / "m"), "--formats", "fp32,int8"],
        capture_output=True,
        text=True,
        cwd=root,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "calibrates on the built-in verification pictures" in run.stderr
    info = json.loads(run.stdout)
    calib = info["variants"]["int8"]["export"]["int8"]["calibration"]
    assert calib["source"] == "verification sample pictures" and "no data set given" in calib["note"]
    assert (tmp_path / "m" / "int8" / "model.onnx").is_file() and "fp16" not in info["variants"]

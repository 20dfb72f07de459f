"""Exporting a checkpoint: the fp32 ONNX graph verified against PyTorch, its int8 and fp16 variants, and
each format's accuracy as the runtime serving it measures it (uses torch).

    out_dir/model.onnx, model.json            fp32 (always)
    out_dir/int8/model.onnx, model.json       when asked for
    out_dir/fp16/model.onnx, model.json       when asked for

The graph and its two exporters are ``deploy.graph``'s; the check against PyTorch is ``deploy.verify``'s;
the variants are ``deploy.quantize``'s; the AP is ``deploy.evaluate``'s. ``export_model`` refuses to finish
unless the fp32 graph (and the fp16 one, to fp16's tolerances) reproduces ``Detector.predict`` on sample
pictures. int8 changes detections by design: its agreement with fp32 and its AP are recorded, and an AP
more than ``AP_WARNING`` points below fp32's marks it ``accuracy_warning`` (still published).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from PIL import Image

from deploy.backends import DEFAULT_BACKEND, OpenVinoSession
from deploy.evaluate import calibration_pictures, runtime_ap
from deploy.graph import (
    OPSET,
    DetectorWithPostprocess,
    ExportError,
    class_nms_keep,
    export_onnx,
    graph_stats,
)
from deploy.precision import CPU_FEATURES, OPENVINO_PRECISION, PrecisionUnavailable, check_cpu
from deploy.quantize import FORMATS, convert_fp16, quantize_int8
from deploy.registry import build_model_json, write_model_json
from deploy.runtime import Predictor, load_image
from deploy.verify import agreement, compare_detections, sample_images, verification_session, verify_onnx
from distill.checkpoint import checkpoint_meta, load_detector, read_checkpoint
from distill.data.images import MEAN, STD
from distill.models.standard_served import served

DEFAULT_INPUT_SIZE = (1333, 800)
# An int8 (or fp16) model more than this many AP points (0-100 scale) below fp32 is marked accuracy_warning.
AP_WARNING = 1.5
CALIBRATION_IMAGES = 32
# int8 against fp32 on the sample pictures: a box within 2% of the image side and a score within 0.05
# counts as the same detection (recorded, never a reason to refuse: the AP is the verdict).
INT8_BOX_TOL, INT8_SCORE_TOL = 0.02, 0.05


def export_model(
    checkpoint_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    formats: Sequence[str] = ("fp32",),
    samples: Sequence[Image.Image | str | os.PathLike] | None = None,
    opset: int = OPSET,
    exporter: str = "torchscript",
    dataset: str | os.PathLike | None = None,
    val_split: float = 0.2,
    seed: int = 0,
    calibration: str | os.PathLike | Sequence[Image.Image] | None = None,
    backend: str = DEFAULT_BACKEND,
    providers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Export a checkpoint (project, of any family, or mmdetection GFL) in ``formats`` (fp32 always) into ``out_dir``.

    ``dataset`` (a data set folder) gives each format its AP on the validation split (``val_split``,
    ``seed``: as training split it), measured by ``backend``/``providers``, the runtime that will serve it.
    ``calibration`` (int8): a data set folder (a seeded draw of ``CALIBRATION_IMAGES`` of its training
    pictures) or the pictures themselves; default ``dataset``'s training pictures, else the sample
    pictures used for verification (few: the description says so).

    Any mismatch with PyTorch raises ``ExportError`` and leaves ``out_dir`` as it was (files are built in a
    hidden folder inside it and moved in once all are made). Returns the fp32 model's description (model.json's
    keys plus ``arch``, ``format``, ``metrics``, ``training_metrics``, ``export``, ``graph``, ``source``,
    ``size_bytes``, ``created_at``, ``accuracy_warning``) with ``variants``: the same for each other
    format, plus ``dir`` (its sub-folder). The service keeps descriptions in the store (``worker.publish``).
    """
    start = time.perf_counter()
    # Checked before the list is put in order: filtering first dropped an unknown format without a word.
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown format(s) {sorted(unknown)}; known: {', '.join(FORMATS)}")
    formats = ["fp32"] + [f for f in FORMATS[1:] if f in formats]
    out_dir = Path(out_dir)
    ckpt = read_checkpoint(checkpoint_path)  # read once, for the model and its facts
    # A standard-form checkpoint (mmdetection's RetinaNet, FCOS, ATSS) is exported as it is, its own decoding in
    # the graph (distill.models.standard_served).
    model = served(load_detector(ckpt, name=str(checkpoint_path)))
    meta = checkpoint_meta(ckpt).get("meta", {}) or {}
    input_size = tuple(int(v) for v in meta.get("input_size") or DEFAULT_INPUT_SIZE)
    input_size = (max(input_size), min(input_size))
    for key, ours in (("mean", MEAN), ("std", STD)):
        if key in meta and not np.allclose(meta[key], ours):
            raise ExportError(f"checkpoint was trained with {key} {meta[key]}, the runtime normalises with {ours}")
    images = [
        load_image(im if isinstance(im, Image.Image) else Path(im).read_bytes(), name=str(im))
        for im in (samples or sample_images())
    ]
    common = {
        "arch": model.arch or "custom", "num_classes": len(model.classes),
        "training_metrics": meta.get("metrics") or {},
        "source": {"checkpoint": str(checkpoint_path), "checkpoint_kind": meta.get("kind")},
    }  # fmt: skip
    settings = {"opset": opset, "exporter": exporter, "family": model.family, "max_detections": model.cfg.max_per_img,
                "score_thr": model.cfg.score_thr, "nms_iou": model.cfg.nms_iou, "nms_pre": model.cfg.nms_pre,
                "reg_max": model.reg_max, "strides": list(model.strides), "torch": torch.__version__,
                "onnx": onnx.__version__, "onnxruntime": ort.__version__}  # fmt: skip

    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp_name:
        tmp = Path(tmp_name)
        made: dict[str, dict[str, Any]] = {}
        t0, c0 = time.perf_counter(), time.process_time()
        proto = export_onnx(model, tmp / "model.onnx", opset=opset, exporter=exporter)
        seconds = {"export": time.perf_counter() - t0, "export_cpu": time.process_time() - c0}
        t0, c0 = time.perf_counter(), time.process_time()
        fp32_session = verification_session(tmp / "model.onnx")
        verification = verify_onnx(tmp / "model.onnx", model, images, input_size, session=fp32_session)
        seconds["verify"], seconds["verify_cpu"] = time.perf_counter() - t0, time.process_time() - c0
        made["fp32"] = {"export": {**settings, "verification": verification}, "graph": graph_stats(proto)}
        for fmt in formats[1:]:
            folder = tmp / fmt
            folder.mkdir()
            t0 = time.perf_counter()
            if fmt == "fp16":
                how = convert_fp16(tmp / "model.onnx", folder / "model.onnx")
                check = verify_onnx(folder / "model.onnx", model, images, input_size, fp16=True)
            elif fmt == "bf16":  # the same graph; OpenVINO runs it in bf16 where the CPU has it (deploy.precision)
                how, check = _bf16(tmp / "model.onnx", folder / "model.onnx", fp32_session, images, input_size, model)
            else:
                pictures, source = _calibration(calibration, dataset, images, val_split, seed)
                how = {
                    **quantize_int8(tmp / "model.onnx", folder / "model.onnx", pictures, input_size),
                    "calibration": source,
                }
                # Against the fp32 session that was just verified, on the same providers: what differs is
                # the quantization only (and no second fp32 session is built).
                int8_session = verification_session(folder / "model.onnx", providers=fp32_session.providers)
                check = agreement(fp32_session, int8_session, images, input_size, box_tol=INT8_BOX_TOL,
                                  score_tol=INT8_SCORE_TOL, score_thr=model.cfg.score_thr,
                                  max_dets=model.cfg.max_per_img)  # fmt: skip
            seconds[fmt] = time.perf_counter() - t0
            made[fmt] = {
                "export": {**settings, fmt: how, "verification": check},
                "graph": graph_stats(onnx.load(str(folder / "model.onnx"))),
            }

        for fmt, info in made.items():
            folder = tmp if fmt == "fp32" else tmp / fmt
            runtime = build_model_json(
                folder / "model.onnx",
                classes=model.classes,
                input_size=list(input_size),
                mean=list(MEAN),
                std=list(STD),
            )
            if fmt in CPU_FEATURES:
                runtime.update(precision=fmt, cpu_features=list(CPU_FEATURES[fmt]))
            write_model_json(folder, runtime)
            # model.json's own "format" is its schema tag; in a description, "format" is the precision.
            info.update(runtime, **common, format=fmt, size_bytes=(folder / "model.onnx").stat().st_size)
            if dataset is not None:
                t0 = time.perf_counter()
                predictor = Predictor(folder, backend=backend, providers=providers)
                info["metrics"] = runtime_ap(predictor, dataset, val_split, seed)
                seconds[f"ap_{fmt}"] = time.perf_counter() - t0
            else:
                info["metrics"] = common["training_metrics"]  # the checkpoint's own, measured in PyTorch
        for fmt, info in made.items():
            info["accuracy_warning"] = _accuracy_warning(made["fp32"]["metrics"], info["metrics"], fmt, dataset)
            info["created_at"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        seconds["total"] = time.perf_counter() - start
        made["fp32"]["export"]["seconds"] = {k: round(v, 2) for k, v in seconds.items()}

        # Everything made and checked: move it in (fp32 last, so a folder with model.onnx is complete).
        for fmt in formats[1:]:
            target = out_dir / fmt
            target.mkdir(exist_ok=True)
            os.replace(tmp / fmt / "model.onnx", target / "model.onnx")
            os.replace(tmp / fmt / "model.json", target / "model.json")
        os.replace(tmp / "model.onnx", out_dir / "model.onnx")
        os.replace(tmp / "model.json", out_dir / "model.json")
    return {**made["fp32"], "variants": {fmt: {**made[fmt], "dir": fmt} for fmt in formats[1:]}}


def _bf16(
    fp32_onnx: Path, out: Path, fp32_session: Any, images: list[Image.Image], input_size: tuple[int, int], model: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Copy the fp32 graph as the bf16 model and compare OpenVINO's bf16 run of it with fp32 (like int8: bf16
    keeps 8 bits of mantissa, so detections differ a little by design; the AP says what it costs)."""
    try:
        check_cpu({"precision": "bf16", "cpu_features": list(CPU_FEATURES["bf16"])})
    except PrecisionUnavailable as e:
        raise ExportError(f"bf16 cannot be made and measured here: {e}") from e
    shutil.copyfile(fp32_onnx, out)
    session = OpenVinoSession(out.read_bytes(), precision=OPENVINO_PRECISION["bf16"])
    check = agreement(fp32_session, session, images, input_size, box_tol=INT8_BOX_TOL, score_tol=INT8_SCORE_TOL,
                      score_thr=model.cfg.score_thr, max_dets=model.cfg.max_per_img)  # fmt: skip
    return {"runtime": "openvino", "inference_precision": "bf16", "cpu_features": list(CPU_FEATURES["bf16"])}, check


def _calibration(
    calibration: str | os.PathLike | Sequence[Image.Image] | None,
    dataset: str | os.PathLike | None,
    samples: list[Image.Image],
    val_split: float,
    seed: int,
) -> tuple[list[Image.Image], dict[str, Any]]:
    """The int8 calibration pictures and where they came from."""
    if calibration is not None and not isinstance(calibration, str | os.PathLike):
        return list(calibration), {"source": "given pictures", "images": len(calibration)}
    folder = calibration if calibration is not None else dataset
    if folder is not None:
        pictures = calibration_pictures(folder, CALIBRATION_IMAGES, val_split, seed)
        return pictures, {"source": "training split", "dataset": str(folder), "images": len(pictures)}
    return samples, {
        "source": "verification sample pictures",
        "images": len(samples),
        "note": "no data set given: calibrated on the built-in sample pictures; pass a data set "
        "(--calibration DATASET_DIR) for ranges that fit the real pictures",
    }


def _accuracy_warning(fp32: dict[str, Any], ours: dict[str, Any], fmt: str, dataset: Any) -> dict[str, Any] | None:
    """None, or the numbers when ``ours`` is more than ``AP_WARNING`` AP points below fp32 (0-100 scale)."""
    if fmt == "fp32" or dataset is None or "AP" not in ours or "AP" not in fp32:
        return None
    drop = 100 * (float(fp32["AP"]) - float(ours["AP"]))
    if drop <= AP_WARNING:
        return None
    return {
        "format": fmt,
        "AP": float(ours["AP"]),
        "fp32_AP": float(fp32["AP"]),
        "drop_points": round(drop, 2),
        "threshold_points": AP_WARNING,
        "message": f"{fmt} loses {drop:.1f} AP against fp32 ({100 * float(ours['AP']):.1f} vs "
        f"{100 * float(fp32['AP']):.1f}); published, but check it before serving it",
    }


__all__ = [
    "AP_WARNING",
    "DetectorWithPostprocess",
    "ExportError",
    "class_nms_keep",
    "compare_detections",
    "export_model",
    "export_onnx",
    "graph_stats",
    "sample_images",
    "verify_onnx",
]

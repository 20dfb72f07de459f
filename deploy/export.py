"""ONNX export of a GFL detector with its post-processing in the graph, verified against PyTorch.

The graph (opset 18, dynamic batch and image size) is the whole of ``GFL.predict``:

- inputs: ``images (N, 3, H, W)`` float32, normalised (``MEAN``/``STD`` on 0-255 RGB), ``H`` and ``W``
  multiples of 32, zero-padded at the bottom and right; ``image_sizes (N, 2)`` float32, the ``(h, w)`` of
  each image inside the padding (its boxes are clipped to it, as ``predict`` clips to ``image_sizes``).
- body: backbone, FPN, head, distribution integral, box decoding in input pixels, per level the
  ``nms_pre`` (1000) best (location, class) scores above ``score_thr`` (0.05), class-aware ONNX
  ``NonMaxSuppression`` (IoU 0.6), the ``max_per_img`` (100) best survivors.
- outputs, a fixed-size padded layout so that a batch comes back as four dense arrays:
  ``boxes (N, K, 4)`` float32 x1y1x2y2 in input pixels, ``scores (N, K)`` float32 (descending),
  ``labels (N, K)`` int64 and ``num_detections (N,)`` int64, with ``K = max_per_img``. Rows at and after
  ``num_detections[i]`` are padding: boxes and scores 0, label -1.

``export_model`` writes ``model.onnx`` and the ``model.json`` the runtime needs (see ``deploy.registry``),
returns the model's full description (architecture, export settings, verification, graph statistics), and
refuses to finish unless ONNX Runtime reproduces ``GFL.predict`` on sample images: the same detections,
boxes within 1e-3 of the image size, the same labels, scores within 1e-4.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import onnxscript.optimizer
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch import Tensor, nn
from torchvision.ops import batched_nms

from deploy.registry import build_model_json, write_model_json
from deploy.runtime import load_image, prepare_batch
from distill.checkpoint import checkpoint_meta, load_detector
from distill.data.annotations import MEAN, STD
from distill.models.gfl import GFL

OPSET = 18
DEFAULT_INPUT_SIZE = (1333, 800)
# Tolerances of the export check (issue 4). fp16 graphs compute in half precision, so they are held to
# looser ones: a score is off by ~1e-3 there and a box by a fraction of a pixel.
BOX_TOL, SCORE_TOL = 1e-3, 1e-4
BOX_TOL_FP16, SCORE_TOL_FP16 = 1e-2, 1e-2


class ExportError(RuntimeError):
    """The exported graph is invalid or does not reproduce the PyTorch detector."""


# ------------------------------------------------------------------------------------ class-aware NMS op
# ONNX NonMaxSuppression has no counterpart among torch's exportable ops, so the graph calls a custom op
# that runs torchvision's NMS in eager mode and is translated to NonMaxSuppression + ScatterND on export.
# Its output has a static shape (a keep mask over the candidates), which keeps the rest of the graph free
# of data-dependent sizes.


@torch.library.custom_op("ldd::class_nms_keep", mutates_args=())
def class_nms_keep(
    boxes: Tensor, scores: Tensor, labels: Tensor, num_classes: int, iou_threshold: float,
    score_threshold: float, max_per_class: int,
) -> Tensor:
    """``boxes (N, M, 4)``, ``scores (N, M)``, ``labels (N, M)`` int64 -> keep mask ``(N, M)`` float32.

    A candidate is kept if its score is above ``score_threshold`` and it survives NMS among candidates of
    its own class, as one of the ``max_per_class`` best of that class (ONNX ``NonMaxSuppression``).
    """
    keep = torch.zeros_like(scores)
    for i in range(boxes.shape[0]):
        valid = (scores[i] > score_threshold).nonzero().squeeze(1)
        kept = valid[batched_nms(boxes[i, valid], scores[i, valid], labels[i, valid], iou_threshold)]
        # ``kept`` is sorted by score: the first ``max_per_class`` of each class survive.
        lab = labels[i, kept]
        rank = (lab[:, None] == lab[None, :]).tril().sum(1)
        keep[i, kept[rank <= max_per_class]] = 1.0
    return keep


@class_nms_keep.register_fake
def _(boxes: Tensor, scores: Tensor, labels: Tensor, num_classes: int, iou_threshold: float,
      score_threshold: float, max_per_class: int) -> Tensor:
    return torch.empty_like(scores)


def _class_nms_keep_onnx(boxes, scores, labels, num_classes: int, iou_threshold: float,  # onnxscript values
                         score_threshold: float, max_per_class: int):
    """The ONNX translation: per-class score planes ``(N, C, M)`` (a candidate scores only in its own
    class), ``NonMaxSuppression`` -> ``(S, 3)`` [batch, class, candidate], scattered into a keep mask.
    NonMaxSuppression reads boxes as [y1, x1, y2, x2]; IoU is the same with x and y swapped, so x1y1x2y2
    goes in unchanged."""
    from onnxscript import opset18 as op

    classes = op.Constant(value=onnx.numpy_helper.from_array(np.arange(num_classes, dtype=np.int64)[None, :, None]))
    own_class = op.Equal(op.Unsqueeze(labels, op.Constant(value_ints=[1])), classes)
    planes = op.Where(own_class, op.Unsqueeze(scores, op.Constant(value_ints=[1])), op.Constant(value_float=0.0))
    selected = op.NonMaxSuppression(
        boxes, planes,
        op.Constant(value_ints=[max_per_class]),
        op.Constant(value_floats=[iou_threshold]),
        op.Constant(value_floats=[score_threshold]),
    )
    index = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)  # (S, 2): batch, candidate
    ones = op.Expand(op.Constant(value_float=1.0), op.Shape(index, end=1))
    return op.ScatterND(op.Mul(scores, op.Constant(value_float=0.0)), index, ones)


# ------------------------------------------------------------------------------------ the exported module


class DetectorWithPostprocess(nn.Module):
    """``GFL`` + ``predict``'s post-processing, vectorised over the batch with static intermediate shapes.

    ``forward(images (N, 3, H, W), image_sizes (N, 2))`` -> ``boxes (N, K, 4)``, ``scores (N, K)``,
    ``labels (N, K)``, ``num_detections (N,)`` (see the module docstring).
    """

    def __init__(self, model: GFL, fp16: bool = False):
        super().__init__()
        if fp16:
            model = copy.deepcopy(model)
            # Backbone, FPN and head in half precision; the integral's bin values stay float32 since
            # decoding runs in float32 (as predict does).
            model = model.half()
            model.bbox_head.integral.float()
        self.model = model
        self.fp16 = fp16
        cfg = model.cfg
        self.num_classes, self.score_thr, self.nms_pre = cfg.num_classes, cfg.score_thr, cfg.nms_pre
        self.nms_iou, self.max_per_img = cfg.nms_iou, cfg.max_per_img

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        cls_scores, bbox_preds = self.model.raw_outputs(images.half() if self.fp16 else images)
        # Decoding and everything after it in float32, as ``predict`` does (the integral upcasts too).
        boxes, scores, counts = self.model.decode([c.float() for c in cls_scores], [b.float() for b in bbox_preds])
        n, c = scores.shape[0], self.num_classes

        # Per level: the nms_pre best (location, class) pairs. Padding each level with nms_pre zero scores
        # makes k a constant (below the threshold, the padding is never kept).
        cand_boxes, cand_scores, cand_labels = [], [], []
        for lvl_boxes, lvl_scores in zip(boxes.split(counts, 1), scores.split(counts, 1), strict=True):
            flat = torch.cat([lvl_scores.reshape(n, -1), lvl_scores.new_zeros(n, self.nms_pre)], 1)
            top_scores, top_idx = flat.topk(self.nms_pre, dim=1)
            loc = (top_idx // c).clamp(max=lvl_boxes.shape[1] - 1)
            cand_boxes.append(lvl_boxes.gather(1, loc[..., None].expand(-1, -1, 4)))
            cand_scores.append(top_scores)
            cand_labels.append(top_idx % c)
        boxes, scores, labels = torch.cat(cand_boxes, 1), torch.cat(cand_scores, 1), torch.cat(cand_labels, 1)
        scores = torch.where(scores > self.score_thr, scores, torch.zeros_like(scores))

        # Clip to each image's own size (h, w), as predict does, before NMS.
        hw = image_sizes.to(boxes.dtype)
        limit = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], 1)[:, None, :]
        boxes = torch.minimum(boxes.clamp(min=0), limit)

        keep = class_nms_keep(boxes, scores, labels, c, self.nms_iou, self.score_thr, self.max_per_img)
        final_scores, idx = (scores * keep).topk(self.max_per_img, dim=1)
        valid = final_scores > 0
        out_boxes = boxes.gather(1, idx[..., None].expand(-1, -1, 4)) * valid[..., None]
        out_labels = torch.where(valid, labels.gather(1, idx), torch.full_like(idx, -1))
        return out_boxes, final_scores, out_labels, valid.sum(1)


# ------------------------------------------------------------------------------------ export and checks


def export_onnx(model: GFL, path: str | os.PathLike, *, fp16: bool = False, opset: int = OPSET) -> onnx.ModelProto:
    """Export ``model`` with post-processing to ``path``; returns the checked ONNX model.

    Batch, height and width are dynamic (heights and widths multiples of 32). The example input is large
    enough that no feature map has a side of 1, which torch.export would otherwise specialise on.
    """
    wrapper = DetectorWithPostprocess(model.eval(), fp16=fp16).eval()
    images = torch.zeros(2, 3, 320, 288, dtype=torch.float32)
    sizes = torch.tensor([[320.0, 288.0], [300.0, 250.0]])
    batch = torch.export.Dim("batch", min=1, max=1024)
    height = 32 * torch.export.Dim("height_32", min=1, max=512)
    width = 32 * torch.export.Dim("width_32", min=1, max=512)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, (images, sizes), dynamo=True, opset_version=opset,
            input_names=["images", "image_sizes"], output_names=["boxes", "scores", "labels", "num_detections"],
            dynamic_shapes=({0: batch, 2: height, 3: width}, {0: batch}),
            custom_translation_table={torch.ops.ldd.class_nms_keep.default: _class_nms_keep_onnx},
            verbose=False,
            # The exporter's optimiser de-duplicates initializers that happen to be equal and drops ops
            # such as a multiplication by 1, so the graph's structure would depend on the weights' values
            # (a fresh model, all of whose level scales are 1, came out with fewer nodes). Only constant
            # folding and dead-node removal are applied, which look at what is constant, not its value:
            # two checkpoints of one architecture give graphs identical in structure.
            optimize=False,
        )
    proto = program.model_proto
    onnxscript.optimizer.fold_constants(proto)
    onnxscript.optimizer.remove_unused_nodes(proto)
    for node in proto.graph.node:  # the exporter's debug notes (FX node text, module stacks): unused
        del node.metadata_props[:]
    onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"onnx.checker rejected the exported graph: {e}") from e
    return proto


def sample_images(seed: int = 0) -> list[Image.Image]:
    """Deterministic test pictures of two sizes and aspect ratios: textured backgrounds with blurred
    blobs, rectangles and strokes, so that a trained detector finds something and an untrained one still
    sees varied input."""
    rng = np.random.default_rng(seed)
    images = []
    for w, h in ((320, 240), (200, 300), (416, 416)):
        base = rng.integers(60, 200, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        im = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(im)
        for _ in range(6):
            x0, y0 = rng.integers(0, w - 20), rng.integers(0, h - 20)
            x1, y1 = x0 + rng.integers(12, max(13, w // 3)), y0 + rng.integers(12, max(13, h // 3))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            if rng.random() < 0.5:
                draw.rectangle((x0, y0, x1, y1), fill=colour)
            else:
                draw.line((x0, y0, x1, y1), fill=colour, width=int(rng.integers(2, 8)))
        images.append(im.filter(ImageFilter.GaussianBlur(1)))
    return images


def _torch_detections(model: GFL, batch: np.ndarray, sizes: np.ndarray) -> list[dict[str, np.ndarray]]:
    with torch.no_grad():
        dets = model.predict(torch.from_numpy(batch), [(int(h), int(w)) for h, w in sizes])
    return [{k: v.float().numpy() if k != "labels" else v.numpy() for k, v in d.items()} for d in dets]


def compare_detections(
    expected: dict[str, np.ndarray], got: dict[str, np.ndarray], image_hw: tuple[float, float], *,
    box_tol: float, score_tol: float, score_thr: float, max_dets: int,
) -> dict[str, Any]:
    """Match two detection sets of one image: same label, box corners within ``box_tol * max(h, w)``,
    score within ``score_tol``. Returns counts, worst errors and ``problems`` (empty when they agree).

    A detection one side has and the other lacks is tolerated only on a decision boundary the two
    computations may legitimately round differently: its score within ``score_tol`` of ``score_thr``, or,
    when the list is full, of the last kept score.
    """
    box_abs = box_tol * max(image_hw)
    free = list(range(len(got["scores"])))
    max_box, max_score, problems, matched = 0.0, 0.0, [], 0
    for i in range(len(expected["scores"])):
        best, best_err = None, math.inf
        for j in free:
            if got["labels"][j] != expected["labels"][i]:
                continue
            err_box = float(np.abs(got["boxes"][j] - expected["boxes"][i]).max())
            err_score = abs(float(got["scores"][j]) - float(expected["scores"][i]))
            if err_box <= box_abs and err_score <= score_tol and err_box + err_score < best_err:
                best, best_err = j, err_box + err_score
                cur = (err_box, err_score)
        if best is None:
            if not _borderline(float(expected["scores"][i]), expected, score_tol, score_thr, max_dets):
                problems.append(f"PyTorch detection {i} (label {int(expected['labels'][i])}, score "
                                f"{float(expected['scores'][i]):.5f}, box {np.round(expected['boxes'][i], 2).tolist()})"
                                " has no match in ONNX Runtime's output")
            continue
        free.remove(best)
        matched += 1
        max_box, max_score = max(max_box, cur[0]), max(max_score, cur[1])
    for j in free:
        if not _borderline(float(got["scores"][j]), got, score_tol, score_thr, max_dets):
            problems.append(f"ONNX Runtime detection (label {int(got['labels'][j])}, score "
                            f"{float(got['scores'][j]):.5f}) has no match in PyTorch's output")
    return {"expected": len(expected["scores"]), "got": len(got["scores"]), "matched": matched,
            "max_box_error_px": max_box, "max_score_error": max_score, "problems": problems}


def _borderline(score: float, dets: dict[str, np.ndarray], tol: float, thr: float, max_dets: int) -> bool:
    if score - thr <= tol:
        return True
    return len(dets["scores"]) >= max_dets and score - float(dets["scores"].min()) <= tol


def verify_onnx(
    onnx_path: str | os.PathLike, model: GFL, images: Sequence[Image.Image], input_size: tuple[int, int], *,
    fp16: bool = False, providers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run the exported graph in ONNX Runtime on ``images`` (one batch of mixed sizes, then each image
    alone) and compare with ``model.predict`` on the same tensors. Raises ``ExportError`` on a mismatch;
    returns the comparison's numbers."""
    providers = list(providers or _verification_providers(fp16))
    session = ort.InferenceSession(str(onnx_path), providers=providers)
    box_tol, score_tol = (BOX_TOL_FP16, SCORE_TOL_FP16) if fp16 else (BOX_TOL, SCORE_TOL)
    reference = model.float().eval()
    groups = [list(images)] + [[im] for im in images]
    stats: dict[str, Any] = {"providers": session.get_providers(), "batches": [len(g) for g in groups],
                             "detections": 0, "max_box_error_px": 0.0, "max_score_error": 0.0,
                             "box_tol": box_tol, "score_tol": score_tol}
    problems: list[str] = []
    for group in groups:
        batch, sizes, _ = prepare_batch(group, input_size)
        boxes, scores, labels, num = session.run(None, {"images": batch, "image_sizes": sizes})
        for i, expected in enumerate(_torch_detections(reference, batch, sizes)):
            k = int(num[i])
            got = {"boxes": boxes[i, :k], "scores": scores[i, :k], "labels": labels[i, :k]}
            result = compare_detections(expected, got, tuple(sizes[i]), box_tol=box_tol, score_tol=score_tol,
                                        score_thr=model.cfg.score_thr, max_dets=model.cfg.max_per_img)
            stats["detections"] += result["matched"]
            stats["max_box_error_px"] = max(stats["max_box_error_px"], result["max_box_error_px"])
            stats["max_score_error"] = max(stats["max_score_error"], result["max_score_error"])
            problems += [f"batch of {len(group)}, image {i} ({int(sizes[i][1])}x{int(sizes[i][0])}): {p}"
                         for p in result["problems"]]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ExportError("ONNX Runtime does not reproduce PyTorch: " + "; ".join(problems[:5]) + more)
    return stats


def _verification_providers(fp16: bool) -> list[str]:
    available = ort.get_available_providers()
    if fp16 and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def graph_stats(proto: onnx.ModelProto) -> dict[str, Any]:
    """Node and parameter counts and the op histogram of a graph (what "same structure" compares)."""
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    return {"nodes": len(proto.graph.node), "parameters": params, "initializers": len(proto.graph.initializer),
            "ops": dict(sorted(ops.items()))}


def export_model(
    checkpoint_path: str | os.PathLike, out_dir: str | os.PathLike, *, fp16: bool = False,
    samples: Sequence[Image.Image | str | os.PathLike] | None = None, opset: int = OPSET,
) -> dict[str, Any]:
    """Export a checkpoint (project or mmdetection GFL) to ``out_dir/model.onnx`` + ``out_dir/model.json``.

    The graph is checked with ``onnx.checker`` and then verified in ONNX Runtime against the PyTorch
    detector on ``samples`` (default: ``sample_images()``); any mismatch raises ``ExportError`` and leaves
    ``out_dir`` as it was (the graph is built in a hidden folder inside it and moved in once verified).
    Returns the model's description: model.json's keys plus ``arch``, ``num_classes``, ``metrics`` (the
    checkpoint's), ``export`` (settings, versions, verification), ``graph``, ``source``, ``size_bytes`` and
    ``created_at``. The service keeps it in the store (``worker.publish``); files keep only model.json.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    model = load_detector(checkpoint_path)
    meta = checkpoint_meta(checkpoint_path).get("meta", {}) or {}
    input_size = tuple(int(v) for v in meta.get("input_size") or DEFAULT_INPUT_SIZE)
    input_size = (max(input_size), min(input_size))
    for key, ours in (("mean", MEAN), ("std", STD)):
        if key in meta and not np.allclose(meta[key], ours):
            raise ExportError(f"checkpoint was trained with {key} {meta[key]}, the runtime normalises with {ours}")
    images = [load_image(im if isinstance(im, Image.Image) else Path(im).read_bytes(), name=str(im))
              for im in (samples or sample_images())]

    out_dir.mkdir(parents=True, exist_ok=True)
    # Build in a hidden folder inside out_dir and move the files in only once verified.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as tmp:
        tmp_onnx = Path(tmp) / "model.onnx"
        proto = export_onnx(model, tmp_onnx, fp16=fp16, opset=opset)
        verification = verify_onnx(tmp_onnx, model, images, input_size, fp16=fp16)  # fp16 export copied it
        runtime = build_model_json(tmp_onnx, classes=model.classes, input_size=list(input_size), mean=list(MEAN),
                                   std=list(STD))
        description = {
            **runtime,
            "arch": model.arch or "custom",
            "num_classes": len(model.classes),
            "metrics": meta.get("metrics") or {},
            "export": {"fp16": fp16, "opset": opset, "max_detections": model.cfg.max_per_img,
                       "score_thr": model.cfg.score_thr, "nms_iou": model.cfg.nms_iou, "nms_pre": model.cfg.nms_pre,
                       "reg_max": model.reg_max, "strides": list(model.strides), "torch": torch.__version__,
                       "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                       "seconds": round(time.perf_counter() - start, 1), "verification": verification},
            "graph": graph_stats(proto),
            "source": {"checkpoint": str(checkpoint_path), "checkpoint_kind": meta.get("kind")},
            "size_bytes": tmp_onnx.stat().st_size,
            "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }  # fmt: skip
        os.replace(tmp_onnx, out_dir / "model.onnx")
        write_model_json(out_dir, runtime)
    return description


__all__ = ["DetectorWithPostprocess", "ExportError", "class_nms_keep", "compare_detections", "export_model",
           "export_onnx", "graph_stats", "sample_images", "verify_onnx"]

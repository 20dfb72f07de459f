"""The exported graph: a detector of any family with its post-processing, traced to ONNX (uses torch).

The graph (opset 18, dynamic batch and image size) is the whole of ``Detector.predict``, through the
family's own ``decode`` (A anchors per location for RetinaNet, the centerness or DGQP quality multiplied
into the scores for FCOS, ATSS and GFocalV2):

- inputs: ``images (N, 3, H, W)`` float32, normalised (``MEAN``/``STD`` on 0-255 RGB), ``H`` and ``W``
  multiples of 32, zero-padded at the bottom and right; ``image_sizes (N, 2)`` float32, the ``(h, w)`` of
  each image inside the padding (its boxes are clipped to it, as ``predict`` clips to ``image_sizes``).
- body: backbone, FPN, head, distribution integral, box decoding in input pixels, per level the
  ``nms_pre`` (1000) best (anchor, class) scores above ``score_thr`` (0.05), class-aware ONNX
  ``NonMaxSuppression`` (IoU 0.6), the ``max_per_img`` (100) best survivors.
- outputs, a fixed-size padded layout so that a batch comes back as four dense arrays:
  ``boxes (N, K, 4)`` float32 x1y1x2y2 in input pixels, ``scores (N, K)`` float32 (descending),
  ``labels (N, K)`` int64 and ``num_detections (N,)`` int64, with ``K = max_per_img``. Rows at and after
  ``num_detections[i]`` are padding: boxes and scores 0, label -1.

Two exporters make that graph. ``torchscript`` (the default) traces one small example through the model:
4-6 s for a gfl_r18 on the shared 2-core CPU. ``dynamo`` (``torch.export``) reasons symbolically about every
shape of the program: 39-49 s for the same model in the same runs (``bench/results/export.md``); it is kept
callable for that comparison.

Node names carry the module scope (``/backbone/...``, ``/neck/...``, ``/bbox_head/...``); everything else
(``/bbox_head/integral/...`` included) is decoding and post-processing, which the int8 and fp16 variants
keep in float32 (``deploy.quantize.network_nodes``).
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Any

import numpy as np
import onnx
import torch
from torch import Tensor, nn
from torch.onnx import symbolic_helper
from torchvision.ops import batched_nms

from distill.models.detector import Detector

OPSET = 18
EXPORTERS = ("torchscript", "dynamo")
INPUT_NAMES = ["images", "image_sizes"]
OUTPUT_NAMES = ["boxes", "scores", "labels", "num_detections"]


class ExportError(RuntimeError):
    """The exported graph is invalid or does not reproduce the PyTorch detector."""


# ------------------------------------------------------------------------------------ class-aware NMS op
# ONNX NonMaxSuppression has no counterpart among torch's exportable ops, so the graph calls a custom op
# that runs torchvision's NMS in eager mode and is translated to NonMaxSuppression + ScatterND on export.
# Its output has a static shape (a keep mask over the candidates), which keeps the rest of the graph free
# of data-dependent sizes.


@torch.library.custom_op("ldd::class_nms_keep", mutates_args=())
def class_nms_keep(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    num_classes: int,
    iou_threshold: float,
    score_threshold: float,
    max_per_class: int,
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
def _(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    num_classes: int,
    iou_threshold: float,
    score_threshold: float,
    max_per_class: int,
) -> Tensor:
    return torch.empty_like(scores)


# The ONNX translation, once per exporter. Per-class score planes ``(N, C, M)`` (a candidate scores only
# in its own class), ``NonMaxSuppression`` -> ``(S, 3)`` [batch, class, candidate], scattered into a keep
# mask. NonMaxSuppression reads boxes as [y1, x1, y2, x2]; IoU is the same with x and y swapped, so
# x1y1x2y2 goes in unchanged.


@symbolic_helper.parse_args("v", "v", "v", "i", "f", "f", "i")
def _class_nms_keep_torchscript(
    g: Any,
    boxes: Any,
    scores: Any,
    labels: Any,
    num_classes: int,
    iou_threshold: float,
    score_threshold: float,
    max_per_class: int,
) -> Any:
    def const(value: Any) -> Any:
        return g.op("Constant", value_t=torch.tensor(value))

    classes = g.op("Constant", value_t=torch.arange(num_classes, dtype=torch.int64)[None, :, None])
    own_class = g.op("Equal", g.op("Unsqueeze", labels, const([1])), classes)
    planes = g.op("Where", own_class, g.op("Unsqueeze", scores, const([1])), const(0.0))
    selected = g.op(
        "NonMaxSuppression", boxes, planes, const([max_per_class]), const([iou_threshold]), const([score_threshold])
    )
    index = g.op("Gather", selected, const([0, 2]), axis_i=1)  # (S, 2): batch, candidate
    ones = g.op("Expand", const(1.0), g.op("Slice", g.op("Shape", index), const([0]), const([1])))
    return g.op("ScatterND", g.op("Mul", scores, const(0.0)), index, ones)


torch.onnx.register_custom_op_symbolic("ldd::class_nms_keep", _class_nms_keep_torchscript, OPSET)


def _class_nms_keep_onnxscript(
    boxes,
    scores,
    labels,
    num_classes: int,
    iou_threshold: float,  # onnxscript values
    score_threshold: float,
    max_per_class: int,
):
    from onnxscript import opset18 as op

    classes = op.Constant(value=onnx.numpy_helper.from_array(np.arange(num_classes, dtype=np.int64)[None, :, None]))
    own_class = op.Equal(op.Unsqueeze(labels, op.Constant(value_ints=[1])), classes)
    planes = op.Where(own_class, op.Unsqueeze(scores, op.Constant(value_ints=[1])), op.Constant(value_float=0.0))
    selected = op.NonMaxSuppression(
        boxes,
        planes,
        op.Constant(value_ints=[max_per_class]),
        op.Constant(value_floats=[iou_threshold]),
        op.Constant(value_floats=[score_threshold]),
    )
    index = op.Gather(selected, op.Constant(value_ints=[0, 2]), axis=1)
    ones = op.Expand(op.Constant(value_float=1.0), op.Shape(index, end=1))
    return op.ScatterND(op.Mul(scores, op.Constant(value_float=0.0)), index, ones)


# ------------------------------------------------------------------------------------ the exported module


class DetectorWithPostprocess(nn.Module):
    """``Detector`` + ``predict``'s post-processing, vectorised over the batch with static intermediate shapes.

    Any model that has ``cfg`` (the inference settings) and ``decode(*raw_outputs(images))`` -> ``boxes (N, A, 4)``,
    ``scores (N, A, C)``, per-level counts is wrapped the same way: a family's ``Detector``, or mmdetection's
    standard RetinaNet/FCOS/ATSS with its own decoding (``distill.models.standard_served.ServedStandard``).

    ``forward(images (N, 3, H, W), image_sizes (N, 2))`` -> ``boxes (N, K, 4)``, ``scores (N, K)``,
    ``labels (N, K)``, ``num_detections (N,)`` (see the module docstring).
    """

    def __init__(self, model: Detector):
        super().__init__()
        self.model = model
        cfg = model.cfg
        self.num_classes, self.score_thr, self.nms_pre = cfg.num_classes, cfg.score_thr, cfg.nms_pre
        self.nms_iou, self.max_per_img = cfg.nms_iou, cfg.max_per_img

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        boxes, scores, counts = self.model.decode(*self.model.raw_outputs(images))
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


# ------------------------------------------------------------------------------------ export


def export_onnx(
    model: Detector, path: str | os.PathLike, *, opset: int = OPSET, exporter: str = "torchscript"
) -> onnx.ModelProto:
    """Export ``model`` (float32) with post-processing to ``path``; returns the checked ONNX model.

    Batch, height and width are dynamic (heights and widths multiples of 32). Whatever the weights' values,
    two models of one architecture give graphs identical in structure (a distilled student is exactly as
    fast as a plain one): no pass that looks at values runs (see ``_export_torchscript``).
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; known: {', '.join(EXPORTERS)}")
    wrapper = DetectorWithPostprocess(model.float().eval()).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        proto = (_export_torchscript if exporter == "torchscript" else _export_dynamo)(wrapper, opset)
    for node in proto.graph.node:  # exporters' debug notes (FX node text, module stacks): unused
        del node.metadata_props[:]
    onnx.save(proto, str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"onnx.checker rejected the exported graph: {e}") from e
    return proto


def _export_torchscript(wrapper: DetectorWithPostprocess, opset: int) -> onnx.ModelProto:
    # One small image is enough: the tracer records shapes as graph operations, so nothing specialises on
    # the example's size (the verification then runs other sizes and batches).
    images, sizes = torch.zeros(1, 3, 64, 64), torch.tensor([[64.0, 64.0]])
    # Into memory: the graph is edited below and written once by export_onnx (a gfl_r18 is 77 MB; writing it
    # and reading it back cost half a second).
    buffer = io.BytesIO()
    torch.onnx.export(
        wrapper, (images, sizes), buffer, dynamo=False, opset_version=opset,
        input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
        dynamic_axes={"images": {0: "batch", 2: "height", 3: "width"}, "image_sizes": {0: "batch"}},
        # Without this the exporter merges initializers whose values happen to be equal (a fresh model's
        # zero biases and unit scales), and the graph's structure would depend on the weights. Initializers
        # are then listed as graph inputs too; they are removed from the inputs below.
        keep_initializers_as_inputs=True,
    )  # fmt: skip
    proto = onnx.load_from_string(buffer.getvalue())
    inputs = [i for i in proto.graph.input if i.name in INPUT_NAMES]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    return proto


def _export_dynamo(wrapper: DetectorWithPostprocess, opset: int) -> onnx.ModelProto:
    import onnxscript.optimizer

    # Large enough that no feature map has a side of 1, which torch.export would otherwise specialise on.
    images = torch.zeros(2, 3, 320, 288, dtype=torch.float32)
    sizes = torch.tensor([[320.0, 288.0], [300.0, 250.0]])
    batch = torch.export.Dim("batch", min=1, max=1024)
    height = 32 * torch.export.Dim("height_32", min=1, max=512)
    width = 32 * torch.export.Dim("width_32", min=1, max=512)
    program = torch.onnx.export(
        wrapper, (images, sizes), dynamo=True, opset_version=opset, input_names=INPUT_NAMES,
        output_names=OUTPUT_NAMES, dynamic_shapes=({0: batch, 2: height, 3: width}, {0: batch}),
        custom_translation_table={torch.ops.ldd.class_nms_keep.default: _class_nms_keep_onnxscript},
        verbose=False,
        # The exporter's optimiser de-duplicates equal initializers and drops ops such as a multiplication
        # by 1 (value-dependent structure); only constant folding and dead-node removal are applied.
        optimize=False,
    )  # fmt: skip
    proto = program.model_proto
    onnxscript.optimizer.fold_constants(proto)
    onnxscript.optimizer.remove_unused_nodes(proto)
    return proto


def graph_stats(proto: onnx.ModelProto) -> dict[str, Any]:
    """Node and parameter counts and the op histogram of a graph (what "same structure" compares)."""
    ops: dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    params = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    return {
        "nodes": len(proto.graph.node),
        "parameters": params,
        "initializers": len(proto.graph.initializer),
        "ops": dict(sorted(ops.items())),
    }

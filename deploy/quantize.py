"""int8 and fp16 variants of an exported fp32 graph, made from the ONNX file itself. Torch-free.

Both change only the network proper (backbone, FPN, head convolutions: ``network_nodes``); the integral,
box decoding, top-k and NMS stay float32, so thresholds, coordinates and the output layout are exactly
those of the fp32 graph.

- ``int8``: static post-training quantization with ONNX Runtime's own tools, in QDQ format (a
  QuantizeLinear/DequantizeLinear pair around each quantized tensor, which every runtime reads: ONNX
  Runtime fuses the pairs into integer kernels, OpenVINO into its own). Convolutions, and in the backbone
  and FPN the residual and top-down additions, ReLUs and max-pooling between them (``CHAIN_OPS``), so that a
  Conv -> ReLU -> Add chain stays in integers (the head's GroupNorm path between its convolutions stays
  float); weights per output channel (int8, symmetric, 7-bit range: ``reduce_range``, below), activations
  per tensor (uint8: ONNX Runtime's x86 kernels are u8 x s8; s8 activations are not fused there and run as
  float convolutions), ranges from min/max over calibration pictures that go through the runtime's own
  preprocessing (``deploy.runtime.prepare_batch``).

  Why 7-bit weights: on x86 CPUs without VNNI (AVX2, AVX-512 before Cascade Lake) a u8 x s8 convolution
  multiplies with ``vpmaddubsw``, which adds two products into a saturating int16: 2 x 255 x 127 overflows it,
  2 x 255 x 64 = 32640 does not. With full-range weights OpenVINO held to AVX-512 without VNNI
  (``ONEDNN_MAX_CPU_ISA=AVX512_CORE``) scored the random-weight test detector 68.8 AP on 48 pictures against
  86.3 with VNNI; with 7-bit weights both gave 85.3, identical detections. With VNNI (no saturation) the
  lost bit cost nothing measurable there (ONNX Runtime 83.1 against 82.9, OpenVINO 85.3 against 86.3).
- ``fp16``: weights and compute of the network in half precision, for GPUs (ONNX Runtime's
  ``float16`` converter, inputs and outputs kept float32). On a CPU, ONNX Runtime runs it by casting back.

The names of the network's nodes carry their module scope (``deploy.graph`` traces with it).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from PIL import Image

from deploy.runtime import prepare_batch
from distill.ckpt_layout import PREDICTORS, QUALITY_LAYERS

FORMATS = ("fp32", "int8", "fp16", "bf16")  # bf16: the fp32 graph, run in bf16 by OpenVINO (deploy.precision)
NETWORK_SCOPES = ("/backbone/", "/neck/", "/bbox_head/")
DECODE_SCOPES = ("/bbox_head/integral",)
# Every family's predictors and quality layers (``gfl_cls``, ``retina_reg``, ``conv_centerness``, ``reg_conf``,
# ...); node names carry a level suffix (``gfl_cls_1``, ...) for the other levels.
OUTPUT_CONVS = tuple(
    sorted(
        {f"/bbox_head/{n}" for names in PREDICTORS.values() for n in names}
        | {f"/bbox_head/{n}" for n in QUALITY_LAYERS.values()}
    )
)
# Besides the convolutions, the ops between them in the backbone and FPN: their additions then read and write
# quantized tensors (ONNX Runtime: QLinearAdd, ReLUs folded into the ranges). Not in the head: quantizing
# GroupNorm's affine additions there rounds each normalised map once more, on its signed range; on a trained
# gfl_tiny (synthetic digits, fp32 AP 45.9) that cost OpenVINO 1.2 AP (ONNX Runtime none) for at most 3% of
# ONNX Runtime's time on gfl_r18 640x384, within the noise of this machine.
CHAIN_OPS = ("Add", "Relu", "MaxPool")
CHAIN_SCOPES = ("/backbone/", "/neck/")


def network_nodes(proto: onnx.ModelProto) -> list[str]:
    """Names of the nodes of the network proper: what int8 quantizes and fp16 halves."""
    return [
        n.name for n in proto.graph.node if n.name.startswith(NETWORK_SCOPES) and not n.name.startswith(DECODE_SCOPES)
    ]


class _Pictures:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over pictures, one prepared batch of one at a time."""

    def __init__(self, images: Sequence[Image.Image], input_size: tuple[int, int]):
        self._feeds: Iterator[dict[str, np.ndarray]] = (
            dict(zip(("images", "image_sizes"), prepare_batch([im], input_size)[:2], strict=True)) for im in images
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # called by some calibrators; ours reads once
        pass


def quantize_int8(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    calibration: Sequence[Image.Image],
    input_size: tuple[int, int],
    *,
    reduce_range: bool = True,
) -> dict[str, object]:
    """Write the int8 (QDQ) variant of the fp32 graph ``src`` to ``dst``, calibrated on ``calibration``
    (RGB pictures, preprocessed as the runtime does at ``input_size``). Returns its settings.
    ``reduce_range=False`` (full 8-bit weights) is for comparisons only: it saturates on CPUs without VNNI."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise ValueError("int8 needs at least one calibration picture")
    proto = onnx.load(str(src))
    # The head's last convolutions give the logits of scores, box distributions and quality: a uint8 step
    # there is a tenth of a logit, which moves scores and NMS decisions. They stay float (a few % of the
    # compute).
    chosen = {
        n.name
        for n in proto.graph.node
        if (n.op_type == "Conv" and not n.name.startswith(OUTPUT_CONVS))
        or (n.op_type in CHAIN_OPS and n.name.startswith(CHAIN_SCOPES))
    }
    nodes = [n for n in network_nodes(proto) if n in chosen]
    with tempfile.TemporaryDirectory() as tmp:
        # The calibrator writes its augmented graph next to the working directory's; keep it in a temporary.
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            quantize_static(
                str(Path(src).absolute()), str(Path(dst).absolute()), _Pictures(calibration, input_size),
                quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv", *CHAIN_OPS],
                nodes_to_quantize=nodes, per_channel=True, reduce_range=reduce_range,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"WeightSymmetric": True, "ActivationSymmetric": False},
            )  # fmt: skip
        finally:
            os.chdir(cwd)
    return {
        "method": "static post-training quantization, QDQ",
        "ops": ["Conv", *CHAIN_OPS],
        "chain_ops_in": [s.strip("/") for s in CHAIN_SCOPES],
        "weights": "int8 per channel, 7-bit range" if reduce_range else "int8 per channel",
        "activations": "uint8 per tensor",
        "calibration_method": "minmax",
        "calibration_images": len(calibration),
        "quantized_nodes": len(nodes),
        "float_convs": [
            p.rsplit("/", 1)[1] for p in OUTPUT_CONVS if any(n.name.startswith(p) for n in proto.graph.node)
        ],
    }


def convert_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> dict[str, object]:
    """Write the fp16 variant of the fp32 graph ``src`` to ``dst`` (network in half precision, decoding and
    post-processing in float32, inputs and outputs float32). Returns its settings."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load(str(src))
    network = set(network_nodes(proto))
    keep_float = [n.name for n in proto.graph.node if n.name not in network]
    half = convert_float_to_float16(proto, keep_io_types=True, node_block_list=keep_float)
    _sort_topologically(half.graph)  # the converter appends its input casts at the end
    onnx.save(half, str(dst))
    onnx.checker.check_model(half)
    return {"method": "onnxruntime float16 converter", "half_nodes": len(network), "float_nodes": len(keep_float)}


def _sort_topologically(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so that every node follows the producers of its inputs (stable otherwise)."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ValueError(f"graph has a cycle or a missing input near node {pending[0].name!r}")
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
        for n in ready:
            ordered.append(n)
            known.update(n.output)
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)

"""The int8 convolution's speed against fp32's on this CPU, one kernel alone: what bounds int8 over fp32 for a
model whose time is nearly all convolution (``bench/latency.py`` reports it beside the model's ratio).

One 3x3 convolution, 256 -> 256 channels on ``(1, 256, 48, 80)`` (the detector head's first level at 640x384,
where most of its time goes), as ONNX Runtime runs each format of the exported detector: fp32 ``Conv``, and the
QDQ form ``deploy.quantize`` writes (uint8 activations, int8 per-channel weights), which ONNX Runtime fuses
into one ``QLinearConv``. Same threads, same session options, calls interleaved.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from deploy.backends import OrtSession

CHANNELS, HEIGHT, WIDTH = 256, 48, 80


def conv_graph(weight: np.ndarray, quantized: bool) -> onnx.ModelProto:
    """``x (1, C, H, W) -> y``: a padded 3x3 convolution with ``weight (C, C, 3, 3)``, in fp32 or in QDQ
    (activations uint8 per tensor, weights int8 symmetric per output channel, output requantized)."""
    names = ["x", "w"]
    inits = [numpy_helper.from_array(weight, "w")]
    nodes = []
    if quantized:
        scales = (np.abs(weight).reshape(len(weight), -1).max(axis=1) / 127).astype(np.float32)
        inits = [numpy_helper.from_array(np.round(weight / scales[:, None, None, None]).astype(np.int8), "wq"),
                 numpy_helper.from_array(scales, "ws"), numpy_helper.from_array(np.zeros(len(weight), np.int8), "wz"),
                 numpy_helper.from_array(np.array(0.02, np.float32), "xs"),
                 numpy_helper.from_array(np.array(0, np.uint8), "xz"),
                 numpy_helper.from_array(np.array(0.05, np.float32), "ys"),
                 numpy_helper.from_array(np.array(128, np.uint8), "yz")]  # fmt: skip
        nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0)]  # fmt: skip
        names = ["xd", "wd"]
    nodes.append(helper.make_node("Conv", names, ["yf" if quantized else "y"], pads=[1, 1, 1, 1]))
    if quantized:
        nodes += [helper.make_node("QuantizeLinear", ["yf", "ys", "yz"], ["yq"]),
                  helper.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, CHANNELS, HEIGHT, WIDTH])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def int8_conv_speedup(
    threads: int | None = None, rounds: int = 30, session_config: Mapping[str, str] | None = None
) -> dict[str, float]:
    """Median fp32 and int8 call times (ms) of the convolution and their ratio (fp32 / int8)."""
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.05, (CHANNELS, CHANNELS, 3, 3)).astype(np.float32)
    feed = {"x": rng.random((1, CHANNELS, HEIGHT, WIDTH), dtype=np.float32)}
    sessions = {}
    for fmt in ("fp32", "int8"):
        # The serving runtime's own session (deploy.backends): the detector's options, not a copy of them.
        graph = conv_graph(weight, fmt == "int8").SerializeToString()
        sessions[fmt] = OrtSession(
            graph, providers=["CPUExecutionProvider"], intra_op_threads=threads, session_config=session_config
        ).session
        sessions[fmt].run(None, feed)
    times: dict[str, list[float]] = {fmt: [] for fmt in sessions}
    for i in range(rounds):
        for fmt in list(sessions) if i % 2 == 0 else list(reversed(sessions)):
            t0 = time.perf_counter()
            sessions[fmt].run(None, feed)
            times[fmt].append(time.perf_counter() - t0)
    fp32, int8 = (float(np.median(times[f]) * 1e3) for f in ("fp32", "int8"))
    return {"fp32_ms": fp32, "int8_ms": int8, "ratio": fp32 / int8}

"""int8 weights in 8 bits against 7 bits (``deploy.quantize``'s ``reduce_range``): what the lost bit costs in
latency and in error, on ONNX Runtime and OpenVINO, on this CPU.

    python bench/int8_range.py [--arch gfl_r18] [--input-size 640 384] [--rounds 12]

Why 7 bits: CPUs without VNNI multiply u8 x s8 pairs into a saturating int16 (``vpmaddubsw``), which
2 x 255 x 127 overflows and 2 x 255 x 64 does not; with VNNI nothing saturates and the kernels are the same
either way, so the latency should not move. An untrained ``--arch`` (head bias shifted so that NMS works, as in
``bench/latency.py``) is exported in fp32 and quantized both ways on the same calibration pictures; the
rows, ONNX Runtime and OpenVINO on each graph, run in turn within each round on the same prepared picture
(batch 1) so that load from other processes hits them alike. Error: mean absolute difference of the head's
score and box logits from fp32's on the sample pictures (what int8 changes; the AP of an untrained model says
nothing). Writes ``bench/results/int8_range.md|json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from latency import SESSION_CONFIG, build_checkpoint, int8_cpu_features
from report import save

from deploy.backends import CPU, OpenVinoSession, OrtSession
from deploy.export import export_model
from deploy.quantize import OUTPUT_CONVS, quantize_int8
from deploy.runtime import prepare_batch
from deploy.verify import sample_images


def with_logits(path: Path) -> tuple[bytes, list[str]]:
    """The graph with the head's float output convolutions as extra outputs, and their names (sorted: the
    quantizer reorders nodes)."""
    proto = onnx.load(str(path))
    names = sorted(n.output[0] for n in proto.graph.node if n.op_type == "Conv" and n.name.startswith(OUTPUT_CONVS))
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    return proto.SerializeToString(), names


def logits(data: bytes, names: list[str], backend: str, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    if backend == "openvino":
        compiled = OpenVinoSession(data).compiled
        ports = [next(o for o in compiled.outputs if n in o.get_names()) for n in names]
        return [[np.asarray(r[o]) for o in ports] for r in (compiled.create_infer_request().infer(f) for f in feeds)]
    session = OrtSession(data, providers=[CPU]).session
    return [session.run(names, f) for f in feeds]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="gfl_r18")
    parser.add_argument("--input-size", type=int, nargs=2, default=(640, 384), metavar=("LONG", "SHORT"))
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--out", default="int8_range")
    args = parser.parse_args()
    size = (int(args.input_size[0]), int(args.input_size[1]))
    pictures = [im for seed in range(3) for im in sample_images(seed=seed)]
    feeds = [dict(zip(("images", "image_sizes"), prepare_batch([p], size)[:2], strict=True)) for p in pictures]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        batch = torch.from_numpy(feeds[0]["images"])
        ckpt = build_checkpoint(args.arch, 0, tmp / "student.pt", size, batch)
        export_model(ckpt, tmp / "model", formats=["fp32"])
        graphs = {"8-bit weights": tmp / "int8_full.onnx", "7-bit weights": tmp / "int8_7bit.onnx"}
        for name, path in graphs.items():
            quantize_int8(tmp / "model" / "model.onnx", path, pictures, size, reduce_range=name.startswith("7"))
        fp32, names = with_logits(tmp / "model" / "model.onnx")
        want = logits(fp32, names, "onnxruntime", feeds)
        rows: dict[str, dict[str, Any]] = {}
        sessions = {}
        for name, path in graphs.items():
            data, _ = with_logits(path)
            for backend in ("onnxruntime", "openvino"):
                got = logits(data, names, backend, feeds)
                pairs = [(g, w) for gs, ws in zip(got, want, strict=True) for g, w in zip(gs, ws, strict=True)]
                error = np.mean([np.abs(g - w).mean() for g, w in pairs])
                rows[f"{backend}, {name}"] = {"backend": backend, "weights": name, "logit_error": float(error)}
                raw = path.read_bytes()
                sessions[f"{backend}, {name}"] = (
                    OrtSession(raw, providers=[CPU], session_config=SESSION_CONFIG)
                    if backend == "onnxruntime"
                    else OpenVinoSession(raw)
                )
    x, s = feeds[0]["images"], feeds[0]["image_sizes"]
    times: dict[str, list[float]] = {k: [] for k in sessions}
    keys = list(sessions)
    for r in range(args.rounds + 2):
        # Every other round in reverse order, so that no row always runs after the same neighbour.
        for key in keys if r % 2 else keys[::-1]:
            session = sessions[key]
            start = time.perf_counter()
            session.run(x, s)
            if r >= 2:  # two warm-up rounds
                times[key].append(time.perf_counter() - start)
    for key, row in rows.items():
        row["median_ms"] = 1000 * float(np.median(times[key]))
        row["p90_ms"] = 1000 * float(np.percentile(times[key], 90))
    # The cost of 7-bit weights per runtime: the median over rounds of the paired ratio (7-bit call / 8-bit call
    # of the same round), which load drifting between rounds does not bias.
    ratios = {
        backend: float(
            np.median(np.array(times[f"{backend}, 7-bit weights"]) / np.array(times[f"{backend}, 8-bit weights"]))
        )
        for backend in ("onnxruntime", "openvino")
    }
    features = int8_cpu_features()
    lines = [
        f"# int8: 8-bit against 7-bit weights ({args.arch}, {size[0]}x{size[1]}, batch 1)",
        "",
        f"CPU int8 features: {', '.join(features) or 'unknown'}; onnxruntime {ort.__version__}; "
        f"{args.rounds} interleaved rounds. Logit error: mean |int8 - fp32| of the head's logits, untrained model.",
        "",
        "| runtime, weights | median ms | p90 ms | logit error |",
        "| --- | ---: | ---: | ---: |",
        *(f"| {k} | {v['median_ms']:.1f} | {v['p90_ms']:.1f} | {v['logit_error']:.4f} |" for k, v in rows.items()),
        "",
        "7-bit / 8-bit latency, median of the per-round ratios: "
        + ", ".join(f"{b} {r:.3f}" for b, r in ratios.items()),
    ]
    data = {"arch": args.arch, "input_size": list(size), "rounds": args.rounds, "cpu_int8_features": features}
    data["rows"], data["latency_ratio_7bit_over_8bit"] = rows, ratios
    print(save(args.out, data, "\n".join(lines)).read_text())


if __name__ == "__main__":
    main()

"""Inference latency of the exported student in every format and runtime we ship, against PyTorch eager and
the teacher, each row with its AP; and the distilled student against an undistilled one of the same
architecture.

    python bench/latency.py [--student CKPT] [--distilled CKPT] [--teacher CKPT] [--dataset DIR]
                            [--student-arch gfl_r18] [--teacher-arch gfl_r50] [--input-size 640 384]
                            [--batches 1 8] [--rounds 12] [--device cpu|cuda] [--threads N] [--fp16]

Every checkpoint is exported with ``deploy.export.export_model`` (verified against PyTorch); the student
also in int8 (calibrated on the data set's training pictures) and, with ``--fp16``, fp16. Rows, each on the
same prepared batch (keep-ratio resize, normalise, pad) so that only the model and its post-processing are
timed: (a) student fp32 and (a8) int8 in ONNX Runtime, (o) fp32 and (o8) int8 in OpenVINO (same ONNX files;
on the CPU, when installed), (ob) bf16 in OpenVINO (its bf16 inference precision; only on a CPU with
``avx512_bf16``, ``deploy.precision``: elsewhere OpenVINO would emulate it, slower than fp32), (b) the student
in PyTorch eager (``GFL.predict``; on CUDA also (b16) in fp16),
(a16) the fp16 export, (c) the teacher, (d) the distilled student (``--distilled``; without it, a second
untrained student labelled as such), and the student through
``Predictor.predict`` from JPEG bytes (decode, preprocessing and mapping back included). Each row's AP is
measured by its own runtime on the validation split of ``--dataset`` (default: the synthetic set), through
the runtime's preprocessing (``deploy.evaluate``).

Timing: after warm-up, ``--rounds`` rounds each make one call of every row in turn, so load from other
processes hits all rows alike. Per-image latency = call time / batch size (median and p90 over rounds);
throughput = batch size / median call time. Distilled vs undistilled: node, parameter and op counts of the
two graphs, and the ratio of their median call times with a bootstrap 90% interval (within noise when the
interval holds 1.0 or the ratio is within 3%). On the CPU, int8's ceiling there: one convolution alone in int8
and in fp32 (``bench/int8_kernel.py``), with the CPU's int8 instructions (VNNI or not).

Without checkpoints, untrained ones are built (the student twice, with different seeds, standing in for a
distilled and an undistilled one); their head biases are shifted so that about 300 candidates per image pass
the score threshold (0.05), as with a trained model, so NMS does real work (their AP is about 0). Writes
``bench/results/latency.md|json|png`` (``latency_cuda.*`` with ``--device cuda``; ``--out`` names others;
the table and chart are ``bench/latency_report.py``'s).
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from int8_kernel import int8_conv_speedup
from latency_report import chart, markdown
from PIL import Image
from report import save

from deploy.evaluate import runtime_ap
from deploy.export import export_model
from deploy.precision import CPU_FEATURES, cpu_flags
from deploy.runtime import DEFAULT_MAX_PIXELS, Predictor, prepare_batch
from distill.checkpoint import atomic_save, build_detector, checkpoint_meta, detector_state, load_detector
from distill.data.annotations import load_coco
from distill.data.synthetic import make_synthetic
from distill.models.gfl import GFL

NUM_CLASSES = 10  # the synthetic digits
# Several sessions share the cores here; a session's threads spinning after its call would slow whichever
# row runs next, so rows would be charged for their neighbours.
SESSION_CONFIG = {"session.intra_op.allow_spinning": "0"}
# x86 int8 dot products: AVX2 multiplies u8 x s8 pairs into saturating 16-bit sums (vpmaddubsw) and widens them
# in a second instruction; VNNI (avx512_vnni, avx_vnni) does both in one, AMX in tiles.
INT8_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def give_detections(model: GFL, batch: torch.Tensor, per_image: int = 300, score: float = 0.05) -> None:
    """Shift the classification bias so that about ``per_image`` (location, class) pairs per image score
    above ``score``: an untrained head scores everything ~0.01, below the threshold, and would leave the
    post-processing idle."""
    with torch.no_grad():
        cls, _ = model.flatten(*model.raw_outputs(batch))
        kth = cls.reshape(cls.shape[0], -1).topk(per_image, dim=1).values[:, -1].mean()
        model.bbox_head.gfl_cls.bias.add_(math.log(score / (1 - score)) - kth)


def build_checkpoint(arch: str, seed: int, path: Path, input_size: tuple[int, int], batch: torch.Tensor) -> Path:
    torch.manual_seed(seed)
    model = build_detector(arch, NUM_CLASSES, [str(i) for i in range(NUM_CLASSES)]).eval()
    give_detections(model, batch)
    atomic_save(detector_state(model, {"input_size": list(input_size), "kind": f"untrained seed {seed}"}), path)
    return path


def graph_signature(path: Path) -> tuple[list[str], list[tuple[int, ...]]]:
    """The op sequence and the initializer shapes: equal for two graphs of the same structure."""
    proto = onnx.load(str(path))
    return [n.op_type for n in proto.graph.node], sorted(tuple(t.dims) for t in proto.graph.initializer)


def bootstrap_ratio(a: list[float], b: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """median(b) / median(a) and its 90% bootstrap interval."""
    rng = np.random.default_rng(seed)
    a_arr, b_arr = np.array(a), np.array(b)
    ratios = [np.median(rng.choice(b_arr, b_arr.size)) / np.median(rng.choice(a_arr, a_arr.size)) for _ in range(n)]
    return float(np.median(b_arr) / np.median(a_arr)), float(np.percentile(ratios, 5)), float(np.percentile(ratios, 95))


def int8_cpu_features() -> list[str]:
    """The CPU's vector instructions that decide int8's speed (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return [f for f in INT8_FEATURES if f in flags]


def summarise(times: list[float], batch: int) -> dict[str, float]:
    per_image = np.array(times) / batch
    return {
        "median_ms": float(np.median(per_image) * 1e3),
        "p90_ms": float(np.percentile(per_image, 90) * 1e3),
        "throughput_ips": float(batch / np.median(times)),
        "calls": len(times),
    }


class TorchPredictor:
    """``Predictor.predict_loaded`` in PyTorch eager (``GFL.predict``), same preprocessing, for the AP column."""

    backend = "pytorch"
    max_pixels = DEFAULT_MAX_PIXELS

    def __init__(self, model: GFL, input_size: tuple[int, int], device: torch.device, half: bool = False):
        self.model, self.input_size, self.device, self.half = model, input_size, device, half
        self.providers = [device.type + (" fp16" if half else "")]

    def predict_loaded(self, images: list[Image.Image]) -> list[list[dict[str, Any]]]:
        batch, sizes, factors = prepare_batch(images, self.input_size)
        x = torch.from_numpy(batch).to(self.device)
        with torch.inference_mode():
            dets = self.model.predict(x.half() if self.half else x, [(int(h), int(w)) for h, w in sizes])
        out = []
        for image, det, (sx, sy) in zip(images, dets, factors, strict=True):
            boxes = det["boxes"].float().cpu().numpy() / np.array([sx, sy, sx, sy])
            boxes = np.minimum(boxes, [image.width, image.height, image.width, image.height])
            out.append(
                [
                    {"box": [float(v) for v in b], "score": float(sc), "label": int(lab)}
                    for b, sc, lab in zip(
                        boxes, det["scores"].float().cpu().numpy(), det["labels"].cpu().numpy(), strict=True
                    )
                ]
            )
        return out


def ap_dataset(ckpt: Path, dataset: Path, synthetic: Path) -> Path | None:
    """The data set a checkpoint's AP is measured on: ``dataset`` when its classes are as many as the
    checkpoint's, else the synthetic set when that fits, else none."""
    num_classes = checkpoint_meta(ckpt)["config"]["num_classes"]
    for candidate in (dataset, synthetic):
        if len(load_coco(candidate).classes) == num_classes:
            return candidate
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", type=Path, help="undistilled student checkpoint")
    parser.add_argument("--distilled", type=Path, help="distilled student checkpoint (same architecture)")
    parser.add_argument("--teacher", type=Path)
    parser.add_argument("--student-arch", default="gfl_r18")
    parser.add_argument("--teacher-arch", default="gfl_r50")
    parser.add_argument("--input-size", type=int, nargs=2, default=(640, 384), metavar=("LONG", "SHORT"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--fp16", action="store_true", help="also the student's fp16 export (GPU)")
    parser.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help="data set folder for the AP column and int8 calibration (default: the synthetic set)",
    )
    parser.add_argument("--val-split", type=float, default=0.2, help="as the student's training job split --dataset")
    parser.add_argument("--val", type=int, default=24, help="synthetic validation pictures (AP)")
    parser.add_argument("--calibration", type=int, default=32, help="synthetic training pictures (int8 calibration)")
    parser.add_argument("--out", default=None, help="results name (default latency / latency_cuda)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    input_size = (max(args.input_size), min(args.input_size))
    out_name = args.out or ("latency" if device.type == "cpu" else f"latency_{device.type}")
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            print(
                "note: this onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu); "
                "ONNX Runtime rows run on the CPU"
            )

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # Real pictures: the synthetic set's validation images (digits on textured backgrounds); its
        # training images calibrate int8, its validation images give every row its AP.
        synthetic = make_synthetic(
            tmp / "data",
            num_train=args.calibration,
            num_val=max(args.val, max(args.batches)),
            image_size=(640, 480),
            seed=0,
        )
        dataset = args.dataset or synthetic
        coco = load_coco(synthetic / "annotations.json")
        pictures = [Image.open(im["path"]).convert("RGB") for im in coco.images if im.get("split") == "val"]
        pictures = (pictures * max(args.batches))[: max(args.batches)]
        jpegs = []
        for im in pictures:
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=90)
            jpegs.append(buf.getvalue())
        calib = torch.from_numpy(prepare_batch(pictures[:2], input_size)[0])

        given = {"student": args.student, "distilled": args.distilled, "teacher": args.teacher}
        ckpts = {
            "student": args.student or build_checkpoint(args.student_arch, 0, tmp / "student.pt", input_size, calib),
            "distilled": args.distilled
            or build_checkpoint(args.student_arch, 1, tmp / "distilled.pt", input_size, calib),
            "teacher": args.teacher or build_checkpoint(args.teacher_arch, 2, tmp / "teacher.pt", input_size, calib),
        }
        # Row (d) is a distilled student only when one is given; otherwise it is a second untrained student (another
        # seed) standing in for one: same graph, so the same speed, which is all this row can show.
        d_name = (
            "(d) distilled student"
            if args.distilled
            else "(d) untrained student, seed 1 (stands in for a distilled one)"
        )
        exports, predictors = {}, {}
        ort_options = {"providers": providers, "intra_op_threads": args.threads, "session_config": SESSION_CONFIG}
        has_openvino = importlib.util.find_spec("openvino") is not None and device.type == "cpu"
        has_bf16 = has_openvino and set(CPU_FEATURES["bf16"]) <= cpu_flags()
        for name, ckpt in ckpts.items():
            t0 = time.perf_counter()
            formats = ["fp32"]
            if name == "student":
                formats += ["int8"] + (["fp16"] if args.fp16 else []) + (["bf16"] if has_bf16 else [])
            exports[name] = export_model(
                ckpt,
                tmp / name,
                formats=formats,
                val_split=args.val_split,
                seed=0,
                dataset=ap_dataset(ckpt, dataset, synthetic),
            )
            print(
                f"exported {name} ({exports[name]['arch']}, {'+'.join(formats)}) in {time.perf_counter() - t0:.0f} s,"
                f" verified on {exports[name]['export']['verification']['detections']} detections"
            )
            predictors[name] = Predictor(tmp / name, **ort_options)
        predictors["student_int8"] = Predictor(tmp / "student" / "int8", **ort_options)
        if args.fp16:
            predictors["student_fp16"] = Predictor(tmp / "student" / "fp16", **ort_options)
        if has_openvino:
            predictors["student_ov"] = Predictor(tmp / "student", backend="openvino", intra_op_threads=args.threads)
            predictors["student_ov_int8"] = Predictor(
                tmp / "student" / "int8", backend="openvino", intra_op_threads=args.threads
            )
        if has_bf16:
            predictors["student_ov_bf16"] = Predictor(
                tmp / "student" / "bf16", backend="openvino", intra_op_threads=args.threads
            )
        student = load_detector(ckpts["student"], device)
        student_set = ap_dataset(ckpts["student"], dataset, synthetic)

        rows: dict[str, Callable[[int], Callable[[], Any]]] = {}
        aps: dict[str, dict[str, Any]] = {}  # row -> its AP on the validation split, measured by that row
        batches = {b: prepare_batch(pictures[:b], input_size) for b in args.batches}
        torch_batches = {
            b: (torch.from_numpy(x).to(device), [(int(h), int(w)) for h, w in s]) for b, (x, s, _) in batches.items()
        }

        def ort_row(name: str) -> Callable[[int], Callable[[], Any]]:
            return lambda b: lambda: predictors[name].run(batches[b][0], batches[b][1])

        def torch_row(
            b: int, model: GFL = student, dev: torch.device = device, half: bool = False
        ) -> Callable[[], Any]:
            images, sizes = torch_batches[b]
            images = images.to(dev).half() if half else images.to(dev)

            def call() -> Any:
                with torch.inference_mode():
                    out = model.predict(images, sizes)
                _sync(dev)
                return out

            return call

        ort_label = "onnxruntime-" + ("cuda" if providers[0].startswith("CUDA") else "cpu")
        rows[f"(a) student fp32, {ort_label}"] = ort_row("student")
        aps[f"(a) student fp32, {ort_label}"] = exports["student"]["metrics"]
        rows[f"(a8) student int8, {ort_label}"] = ort_row("student_int8")
        aps[f"(a8) student int8, {ort_label}"] = exports["student"]["variants"]["int8"]["metrics"]
        if has_openvino:
            rows["(o) student fp32, openvino-cpu"] = ort_row("student_ov")
            rows["(o8) student int8, openvino-cpu"] = ort_row("student_ov_int8")
            for r, name in (
                ("(o) student fp32, openvino-cpu", "student_ov"),
                ("(o8) student int8, openvino-cpu", "student_ov_int8"),
            ):
                aps[r] = runtime_ap(predictors[name], student_set, args.val_split, 0) if student_set else {}
        if has_bf16:
            rows["(ob) student bf16, openvino-cpu"] = ort_row("student_ov_bf16")
            aps["(ob) student bf16, openvino-cpu"] = exports["student"]["variants"]["bf16"]["metrics"]
        rows[f"(b) student, pytorch eager {device.type}"] = torch_row
        aps[f"(b) student, pytorch eager {device.type}"] = (
            runtime_ap(TorchPredictor(student, input_size, device), student_set, args.val_split, 0)
            if student_set
            else {}
        )
        if device.type != "cpu":
            student_cpu = load_detector(ckpts["student"], "cpu")
            rows["(b) student, pytorch eager cpu"] = lambda b: torch_row(b, student_cpu, torch.device("cpu"))
            student_half = load_detector(ckpts["student"], device).half()
            rows[f"(b16) student fp16, pytorch eager {device.type}"] = lambda b: torch_row(
                b, student_half, device, half=True
            )
            aps[f"(b16) student fp16, pytorch eager {device.type}"] = (
                runtime_ap(TorchPredictor(student_half, input_size, device, half=True), student_set, args.val_split, 0)
                if student_set
                else {}
            )
        rows[f"(c) teacher, {ort_label}"] = ort_row("teacher")
        aps[f"(c) teacher, {ort_label}"] = exports["teacher"]["metrics"]
        rows[f"{d_name}, {ort_label}"] = ort_row("distilled")
        aps[f"{d_name}, {ort_label}"] = exports["distilled"]["metrics"]
        rows[f"student end-to-end (JPEG bytes -> detections), {ort_label}"] = lambda b: (
            lambda: predictors["student"].predict(jpegs[:b])
        )
        if args.fp16:
            rows[f"(a16) student fp16, {ort_label}"] = ort_row("student_fp16")
            aps[f"(a16) student fp16, {ort_label}"] = exports["student"]["variants"]["fp16"]["metrics"]

        load_before = os.getloadavg()
        times: dict[str, dict[int, list[float]]] = {r: {b: [] for b in args.batches} for r in rows}
        for b in args.batches:
            calls = {r: make(b) for r, make in rows.items()}
            for _ in range(args.warmup):
                for call in calls.values():
                    call()
            for i in range(args.rounds):
                # Alternate the order so that neither of a pair always runs first.
                order = list(calls) if i % 2 == 0 else list(reversed(calls))
                for r in order:
                    t0 = time.perf_counter()
                    calls[r]()
                    times[r][b].append(time.perf_counter() - t0)
            print(f"batch {b}: done")

        results: dict[str, Any] = {
            "device": args.device,
            "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads or torch.get_num_threads(),
            # Other processes' load (1-minute average) before and after timing: read the numbers with it.
            "load_average": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "providers": providers,
            "input_size": list(input_size),
            "image_size": [640, 480],
            "rounds": args.rounds,
            "checkpoints": {k: str(given[k]) if given[k] else f"untrained {exports[k]['arch']}" for k in ckpts},
            "rows": {r: {str(b): summarise(ts, b) for b, ts in per_b.items()} for r, per_b in times.items()},
            "ap": {
                r: {k: v for k, v in ap.items() if k in ("AP", "AP50", "images", "backend")} for r, ap in aps.items()
            },
            "ap_dataset": str(args.dataset) if args.dataset else "synthetic validation split",
            "int8_accuracy_warning": exports["student"]["variants"]["int8"]["accuracy_warning"],
            "cpu_int8_features": int8_cpu_features(),
            # bf16's row needs these (deploy.precision); without them it is left out, not emulated.
            "cpu_bf16_features": sorted(set(CPU_FEATURES["bf16"]) & cpu_flags()),
            "int8_conv_kernel": int8_conv_speedup(args.threads, session_config=SESSION_CONFIG)
            if device.type == "cpu"
            else None,
        }
        if device.type == "cuda":
            results["gpu"] = torch.cuda.get_device_name(device)
        sig_s = graph_signature(tmp / "student" / "model.onnx")
        sig_d = graph_signature(tmp / "distilled" / "model.onnx")
        comparison: dict[str, Any] = {
            "student_graph": {k: v for k, v in exports["student"]["graph"].items() if k != "ops"},
            "distilled_graph": {k: v for k, v in exports["distilled"]["graph"].items() if k != "ops"},
            "same_ops": exports["student"]["graph"]["ops"] == exports["distilled"]["graph"]["ops"],
            "identical_structure": sig_s == sig_d,
            "teacher_graph": {k: v for k, v in exports["teacher"]["graph"].items() if k != "ops"},
            "latency_ratio": {},
        }
        a_row, d_row = f"(a) student fp32, {ort_label}", f"{d_name}, {ort_label}"
        for b in args.batches:
            ratio, lo, hi = bootstrap_ratio(times[a_row][b], times[d_row][b])
            comparison["latency_ratio"][str(b)] = {
                "ratio": ratio,
                "ci90": [lo, hi],
                "within_noise": bool(lo <= 1.0 <= hi or abs(ratio - 1) <= 0.03),
            }
        a_med = {b: results["rows"][a_row][str(b)]["median_ms"] for b in args.batches}
        results["distilled_vs_undistilled"] = comparison
        # ONNX Runtime against eager on the device ORT ran on (an ORT-CPU vs eager-CUDA ratio means nothing).
        eager_row = f"(b) student, pytorch eager {ort_label.rsplit('-', 1)[1]}"
        med = {r: {b: results["rows"][r][str(b)]["median_ms"] for b in args.batches} for r in results["rows"]}
        results["speedups"] = {
            str(b): {
                "ort_vs_eager": med[eager_row][b] / a_med[b],
                "teacher_vs_student": med[f"(c) teacher, {ort_label}"][b] / a_med[b],
                "int8_vs_fp32": a_med[b] / med[f"(a8) student int8, {ort_label}"][b],
                **(
                    {
                        "openvino_fp32_vs_ort_fp32": a_med[b] / med["(o) student fp32, openvino-cpu"][b],
                        "openvino_int8_vs_ort_fp32": a_med[b] / med["(o8) student int8, openvino-cpu"][b],
                    }
                    if has_openvino
                    else {}
                ),
                **(
                    {"openvino_bf16_vs_ort_fp32": a_med[b] / med["(ob) student bf16, openvino-cpu"][b]}
                    if has_bf16
                    else {}
                ),
            }
            for b in args.batches
        }

    md = markdown(results)
    chart(results, save(out_name, results, md).with_suffix(".png"))
    print(md)


if __name__ == "__main__":
    main()

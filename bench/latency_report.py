"""The report of ``bench/latency.py``: its markdown table and its bar chart, from the results it saves
(``bench/results/latency*.json``), so a saved run can be rendered again without timing anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def markdown(res: dict[str, Any]) -> str:
    batches = list(next(iter(res["rows"].values())))
    lines = [
        f"# Inference latency ({res['device']})",
        "",
        f"`python bench/latency.py{' --device cuda' if res['device'] == 'cuda' else ''}`: "
        f"{res['cpu_count']} CPU cores, {res['threads']} threads, torch {res['torch']}, "
        f"onnxruntime {res['onnxruntime']} ({', '.join(res['providers'])})"
        + (f", GPU {res['gpu']}" if res.get("gpu") else "")
        + (
            f"; 1-minute load average {res['load_average'][0]} before timing, {res['load_average'][1]} after"
            if res.get("load_average")
            else ""
        )
        + ".",
        f"Synthetic-set pictures of 640x480 resized to fit {res['input_size'][0]}x{res['input_size'][1]} (keep ratio, "
        f"padded to 32); post-processing (top-k, NMS) included in every row; {res['rounds']} interleaved rounds "
        "after warm-up. Checkpoints: " + ", ".join(f"{k} = {v}" for k, v in res["checkpoints"].items()) + ".",
        "",
        f"AP: COCO AP (0-100) on {res.get('ap_dataset', '?')}, measured by the row's own runtime through the "
        "runtime's preprocessing (`deploy.evaluate`); an untrained checkpoint scores about 0.",
        "",
        "| row | batch | per-image median (ms) | per-image p90 (ms) | throughput (images/s) | AP | AP50 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row, per_b in res["rows"].items():
        ap = res.get("ap", {}).get(row) or {}
        ap_cells = f"{100 * ap['AP']:.1f} | {100 * ap['AP50']:.1f}" if "AP" in ap else "- | -"
        for b in batches:
            s = per_b[b]
            lines.append(
                f"| {row} | {b} | {s['median_ms']:.1f} | {s['p90_ms']:.1f} | {s['throughput_ips']:.1f} | {ap_cells} |"
            )
    lines += [
        "",
        "| batch | ORT fp32 over PyTorch eager (same device) | teacher / student (ORT) | int8 over fp32 (ORT) "
        "| OpenVINO fp32 over ORT fp32 | OpenVINO int8 over ORT fp32 | OpenVINO bf16 over ORT fp32 |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for b in batches:
        sp = res["speedups"][b]
        ov = (
            f"{sp['openvino_fp32_vs_ort_fp32']:.2f}x | {sp['openvino_int8_vs_ort_fp32']:.2f}x"
            if "openvino_fp32_vs_ort_fp32" in sp
            else "- | -"
        )
        bf16 = f"{sp['openvino_bf16_vs_ort_fp32']:.2f}x" if "openvino_bf16_vs_ort_fp32" in sp else "-"
        lines.append(
            f"| {b} | {sp['ort_vs_eager']:.2f}x | {sp['teacher_vs_student']:.2f}x | "
            f"{sp.get('int8_vs_fp32', float('nan')):.2f}x | {ov} | {bf16} |"
        )
    if "cpu_bf16_features" in res:
        lines += [
            "",
            "- CPU bf16 instructions: "
            + (", ".join(res["cpu_bf16_features"]) or "none (no bf16 row: OpenVINO would emulate it, slowly)"),
        ]
    features, kernel = res.get("cpu_int8_features"), res.get("int8_conv_kernel")
    if features is not None and kernel:
        vnni = [f for f in features if "vnni" in f or f.startswith("amx")]
        lines += [
            "",
            f"- int8 ceiling on this CPU: one 3x3 256-channel convolution of the head alone runs "
            f"{kernel['ratio']:.2f}x faster in int8 than in fp32 ({kernel['int8_ms']:.1f} vs "
            f"{kernel['fp32_ms']:.1f} ms, `bench/int8_kernel.py`): for a model whose time is nearly all "
            "convolution (gfl_r18 at 640x384), int8 over fp32 cannot exceed about that; at small inputs the "
            "quantize/dequantize steps and the float post-processing weigh more. CPU int8 instructions: "
            + (", ".join(features) or "none listed")
            + (
                f" (VNNI: {', '.join(vnni)})."
                if vnni
                else " (no VNNI: avx512_vnni / avx_vnni multiply and "
                "widen u8 x s8 in one instruction; AVX2 takes two, vpmaddubsw and vpmaddwd)."
            ),
        ]
    warning = res.get("int8_accuracy_warning")
    if warning:
        lines += ["", f"- int8 accuracy warning: {warning['message']}"]
    c = res["distilled_vs_undistilled"]
    # Without a distilled checkpoint, row (d) is a second untrained student: say so rather than call it distilled.
    real = not str(res["checkpoints"]["distilled"]).startswith("untrained")
    a, d = ("undistilled", "distilled") if real else ("(a)", "(d)")
    lines += [
        "",
        "## Distilled vs undistilled student (same architecture)"
        if real
        else "## Row (d) vs row (a): the same architecture, row (d) untrained (no distilled checkpoint was given)",
        "",
        f"- graphs: {a} {c['student_graph']['nodes']} nodes / {c['student_graph']['parameters']:,} parameters, "
        f"{d} {c['distilled_graph']['nodes']} nodes / {c['distilled_graph']['parameters']:,} parameters; "
        f"same op counts: {c['same_ops']}; identical op sequence and initializer shapes: {c['identical_structure']}",
        f"- teacher graph for reference: {c['teacher_graph']['nodes']} nodes / {c['teacher_graph']['parameters']:,} "
        "parameters",
    ]
    for b, r in c["latency_ratio"].items():
        lines.append(
            f"- batch {b}: latency ratio {d} / {a} = {r['ratio']:.3f} "
            f"(90% bootstrap interval {r['ci90'][0]:.3f}-{r['ci90'][1]:.3f}): "
            + ("within noise" if r["within_noise"] else "NOT within noise")
        )
    return "\n".join(lines) + "\n"


def chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(res["rows"])
    batches = list(next(iter(res["rows"].values())))
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(rows) * len(batches) + 1.5))
    height = 0.8 / len(batches)
    for j, b in enumerate(batches):
        y = np.arange(len(rows)) + j * height
        med = [res["rows"][r][b]["median_ms"] for r in rows]
        p90 = [res["rows"][r][b]["p90_ms"] for r in rows]
        ax.barh(
            y, med, height, xerr=[np.zeros(len(rows)), np.array(p90) - np.array(med)], label=f"batch {b}", capsize=3
        )
    ax.set_yticks(
        np.arange(len(rows)) + height * (len(batches) - 1) / 2, [r.replace(", ", "\n") for r in rows], fontsize=8
    )
    ax.invert_yaxis()
    ax.set_xlabel("per-image latency, ms (bar: median, whisker: p90)")
    ax.set_title(f"GFL inference latency ({res['device']}, input {res['input_size'][0]}x{res['input_size'][1]})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

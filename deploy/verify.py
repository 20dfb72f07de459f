"""Checking an exported graph: detections of the graph in a runtime against the PyTorch detector's (uses torch).

``verify_onnx`` runs the graph on sample pictures (one batch of mixed sizes: padding, per-picture clipping,
and a batch and input size the graph was not traced with; at the model's input size, at most
``VERIFY_MAX_SIDE``) and compares with
``Detector.predict`` on the same tensors: the same detections, boxes within ``box_tol`` of the image size, the
same labels, scores within ``score_tol``. fp32 is held to 1e-3 / 1e-4; fp16 computes in half precision,
where a score is off by ~1e-3 and a box by a fraction of a pixel, so it is held to 1e-2 / 1e-2, and up to
``UNMATCHED_FP16`` of its detections may fall the other way of an NMS or top-k decision. int8 changes
detections by design: it is not verified against PyTorch but measured (``agreement`` against fp32, and
its AP: ``deploy.evaluate``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from deploy.backends import Session, make_session
from deploy.graph import ExportError
from deploy.runtime import prepare_batch
from distill.models.detector import Detector

BOX_TOL, SCORE_TOL = 1e-3, 1e-4
BOX_TOL_FP16, SCORE_TOL_FP16 = 1e-2, 1e-2
# In half precision two overlapping boxes near the NMS IoU threshold (or two scores at the top-k cut) may be
# decided the other way: up to this share of fp16 detections may be unmatched, each counted.
UNMATCHED_FP16 = 0.05
# The sample pictures are at most 416 pixels wide: checking at a larger input size only upscales them, and
# costs seconds per call on a CPU (a 1333x800 model is checked at 416x250: the same graph, its shapes
# still dynamic; its accuracy at its own size is the AP that deploy.evaluate measures).
VERIFY_MAX_SIDE = 416
NO_SPIN = {"session.intra_op.allow_spinning": "0", "session.inter_op.allow_spinning": "0"}


def verification_size(input_size: tuple[int, int]) -> tuple[int, int]:
    """``input_size`` (long, short) scaled down, keeping its ratio, to at most ``VERIFY_MAX_SIDE``."""
    scale = min(1.0, VERIFY_MAX_SIDE / max(input_size))
    return (round(max(input_size) * scale), round(min(input_size) * scale))


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


def _torch_detections(model: Detector, batch: np.ndarray, sizes: np.ndarray) -> list[dict[str, np.ndarray]]:
    with torch.no_grad():
        dets = model.predict(torch.from_numpy(batch), [(int(h), int(w)) for h, w in sizes])
    return [{k: v.float().numpy() if k != "labels" else v.numpy() for k, v in d.items()} for d in dets]


def compare_detections(
    expected: dict[str, np.ndarray],
    got: dict[str, np.ndarray],
    image_hw: tuple[float, float],
    *,
    box_tol: float,
    score_tol: float,
    score_thr: float,
    max_dets: int,
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
                problems.append(
                    f"PyTorch detection {i} (label {int(expected['labels'][i])}, score "
                    f"{float(expected['scores'][i]):.5f}, box {np.round(expected['boxes'][i], 2).tolist()})"
                    " has no match in the graph's output"
                )
            continue
        free.remove(best)
        matched += 1
        max_box, max_score = max(max_box, cur[0]), max(max_score, cur[1])
    for j in free:
        if not _borderline(float(got["scores"][j]), got, score_tol, score_thr, max_dets):
            problems.append(
                f"graph detection (label {int(got['labels'][j])}, score "
                f"{float(got['scores'][j]):.5f}) has no match in PyTorch's output"
            )
    return {
        "expected": len(expected["scores"]),
        "got": len(got["scores"]),
        "matched": matched,
        "max_box_error_px": max_box,
        "max_score_error": max_score,
        "problems": problems,
    }


def _borderline(score: float, dets: dict[str, np.ndarray], tol: float, thr: float, max_dets: int) -> bool:
    if score - thr <= tol:
        return True
    return len(dets["scores"]) >= max_dets and score - float(dets["scores"].min()) <= tol


def verification_groups(images: Sequence[Image.Image]) -> list[list[Image.Image]]:
    """All pictures in one padded batch: pictures of several sizes, so padding and per-picture clipping are
    checked, at a batch size and an input size the graph was not traced with (dynamic shapes)."""
    return [list(images)]


def verification_session(
    onnx_path: str | os.PathLike,
    *,
    fp16: bool = False,
    backend: str = "onnxruntime",
    providers: Sequence[str] | None = None,
) -> Session:
    """The session ``verify_onnx`` checks the graph at ``onnx_path`` in (ONNX Runtime: the CPU for fp32, CUDA
    when present for fp16)."""
    with open(onnx_path, "rb") as f:
        # No spinning: ONNX Runtime's idle threads would take the cores from the PyTorch reference between calls.
        return make_session(
            f.read(), backend=backend, providers=providers or _verification_providers(fp16), session_config=NO_SPIN
        )


def verify_onnx(
    onnx_path: str | os.PathLike,
    model: Detector,
    images: Sequence[Image.Image],
    input_size: tuple[int, int],
    *,
    fp16: bool = False,
    backend: str = "onnxruntime",
    providers: Sequence[str] | None = None,
    session: Session | None = None,
) -> dict[str, Any]:
    """Run the exported graph in ``backend`` on ``images`` (``verification_groups``) and compare with
    ``model.predict`` on the same tensors. Raises ``ExportError`` on a mismatch; returns the comparison's
    numbers. ``session``: one already open on ``onnx_path`` (``verification_session``), used instead of
    opening another (an export measures int8 against the same fp32 session)."""
    if session is None:
        session = verification_session(onnx_path, fp16=fp16, backend=backend, providers=providers)
    box_tol, score_tol = (BOX_TOL_FP16, SCORE_TOL_FP16) if fp16 else (BOX_TOL, SCORE_TOL)
    allowed = UNMATCHED_FP16 if fp16 else 0.0
    reference = model.float().eval()
    input_size = verification_size(input_size)
    groups = verification_groups(images)
    stats: dict[str, Any] = {
        "backend": session.backend,
        "providers": session.providers,
        "input_size": list(input_size),
        "batches": [len(g) for g in groups],
        "detections": 0,
        "max_box_error_px": 0.0,
        "max_score_error": 0.0,
        "box_tol": box_tol,
        "score_tol": score_tol,
        "unmatched": 0,
    }
    problems: list[str] = []
    for group in groups:
        batch, sizes, _ = prepare_batch(group, input_size)
        got_all = _unpad(*session.run(batch, sizes))
        for i, (expected, got) in enumerate(zip(_torch_detections(reference, batch, sizes), got_all, strict=True)):
            result = compare_detections(
                expected,
                got,
                tuple(sizes[i]),
                box_tol=box_tol,
                score_tol=score_tol,
                score_thr=model.cfg.score_thr,
                max_dets=model.cfg.max_per_img,
            )
            stats["detections"] += result["matched"]
            stats["max_box_error_px"] = max(stats["max_box_error_px"], result["max_box_error_px"])
            stats["max_score_error"] = max(stats["max_score_error"], result["max_score_error"])
            problems += [
                f"batch of {len(group)}, image {i} ({int(sizes[i][1])}x{int(sizes[i][0])}): {p}"
                for p in result["problems"]
            ]
    stats["unmatched"] = len(problems)
    if len(problems) > allowed * max(1, stats["detections"]):
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ExportError(f"{session.backend} does not reproduce PyTorch: " + "; ".join(problems[:5]) + more)
    return stats


def agreement(
    reference: Any,
    candidate: Any,
    images: Sequence[Image.Image],
    input_size: tuple[int, int],
    *,
    box_tol: float,
    score_tol: float,
    score_thr: float = 0.05,
    max_dets: int = 100,
) -> dict[str, Any]:
    """How far ``candidate``'s detections are from ``reference``'s (two sessions with ``run(batch, sizes)``)
    on the same prepared batches: counts, matches within the tolerances, worst errors. Raises nothing: an
    int8 graph differs by design, and what it costs is measured as AP."""
    out: dict[str, Any] = {
        "reference": 0,
        "candidate": 0,
        "matched": 0,
        "max_box_error_px": 0.0,
        "max_score_error": 0.0,
        "box_tol": box_tol,
        "score_tol": score_tol,
    }
    input_size = verification_size(input_size)
    for group in verification_groups(images):
        batch, sizes, _ = prepare_batch(group, input_size)
        for i, (exp, got) in enumerate(
            zip(_unpad(*reference.run(batch, sizes)), _unpad(*candidate.run(batch, sizes)), strict=True)
        ):
            r = compare_detections(
                exp, got, tuple(sizes[i]), box_tol=box_tol, score_tol=score_tol, score_thr=score_thr, max_dets=max_dets
            )
            out["reference"] += r["expected"]
            out["candidate"] += r["got"]
            out["matched"] += r["matched"]
            out["max_box_error_px"] = max(out["max_box_error_px"], r["max_box_error_px"])
            out["max_score_error"] = max(out["max_score_error"], r["max_score_error"])
    out["match_rate"] = out["matched"] / max(1, out["reference"])
    return out


def _unpad(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, num: np.ndarray) -> list[dict[str, np.ndarray]]:
    return [
        {"boxes": boxes[i, :k], "scores": scores[i, :k], "labels": labels[i, :k]}
        for i, k in enumerate(int(v) for v in num)
    ]


def _verification_providers(fp16: bool) -> list[str] | None:
    import onnxruntime as ort

    if fp16 and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]

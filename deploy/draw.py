"""Detections drawn on an image with Pillow: the one drawing function of the project (``ldd detect --draw``,
``python -m deploy predict --draw`` and the web UI use it). Torch-free, and no ONNX Runtime either."""

from __future__ import annotations

import colorsys
import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from distill.data.images import read_image

# A decoded image, an image file's bytes (an upload) or its path (the command line).
ImageSource = Image.Image | bytes | str | os.PathLike[str]


def label_colour(label: int) -> tuple[int, int, int]:
    """A stable, well-separated colour per class index (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((label * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def draw_detections(
    image: ImageSource,
    detections: Sequence[dict[str, Any]],
    *,
    min_score: float = 0.0,
) -> Image.Image:
    """A new RGB image: ``image`` with each detection's box and ``"class_name score"`` label.

    ``detections`` are ``{"box": [x1, y1, x2, y2], "score", "label", "class_name"}`` in the image's pixels
    (``score`` None for ground truth: the label is the class name alone),
    as ``deploy.runtime.Predictor.predict`` and ``/detect`` return them. Bytes and paths are decoded with
    their EXIF orientation applied, as the runtime decodes them, so the boxes land where they were found;
    a PIL image is taken as it is (``deploy.runtime.load_image``'s output, say). The image is not changed.
    """
    if isinstance(image, Image.Image):
        out = image.convert("RGB")  # a copy, even when it is RGB already
    else:
        out = read_image(io.BytesIO(image) if isinstance(image, bytes) else image)
    draw = ImageDraw.Draw(out)
    side = min(out.size)
    line = max(1, side // 250)
    font = _font(max(10, side // 40))
    # Ground-truth boxes come with score None: they are drawn with their class name alone.
    for det in sorted(detections, key=lambda d: 1.0 if d.get("score") is None else d["score"]):  # best on top
        if det.get("score") is not None and det["score"] < min_score:
            continue
        colour = label_colour(int(det["label"]))
        x1, y1, x2, y2 = (float(v) for v in det["box"])
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        name = det.get("class_name", det["label"])
        text = str(name) if det.get("score") is None else f"{name} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 2 * line if y1 - th - 2 * line >= 0 else y1  # above the box, or inside at the top
        draw.rectangle((x1, ty, x1 + tw + 2 * line, ty + th + 2 * line), fill=colour)
        draw.text((x1 + line - left, ty + line - top), text, fill=(0, 0, 0), font=font)
    return out


def heat_colour(values: np.ndarray) -> np.ndarray:
    """Values in ``[0, 1]`` ``(H, W)`` -> RGB ``(H, W, 3)`` uint8 on a dark-blue -> yellow ramp (readable in
    grey too: its brightness rises with the value)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    low, mid, high = np.array([20, 30, 110.0]), np.array([200, 40, 90.0]), np.array([255, 230, 60.0])
    rgb = np.where(v < 0.5, low + (mid - low) * (v / 0.5), mid + (high - mid) * ((v - 0.5) / 0.5))
    return rgb.astype(np.uint8)


def draw_error_maps(image: ImageSource, figure: dict[str, Any], panel: int = 320) -> Image.Image:
    """The paper's figure 5 for one job: per location at P5 and P6, the student's box-logit error to the
    teacher (``distill.logit_maps``), before distillation (top row) and after it (bottom row), over the image.

    ``figure`` is ``{"before": fig, "after": fig}``, each ``fig`` as ``distill.logit_maps.figure5`` stores it
    (``size`` the resized image (h, w), ``strides``, ``maps``). Each column shares one colour scale (its
    largest error, printed), so before and after compare; the image shows through at half strength.
    """
    base = (
        image.convert("RGB")
        if isinstance(image, Image.Image)
        else read_image(io.BytesIO(image) if isinstance(image, bytes) else image)
    )
    rows = [("before", figure["before"]), ("after", figure["after"])]
    strides = rows[1][1]["strides"]
    h, w = rows[1][1]["size"]
    scale = panel / max(h, w)
    pw, ph = max(1, round(w * scale)), max(1, round(h * scale))
    photo = base.resize((pw, ph))
    font = _font(14)
    top, left = 22, 70
    out = Image.new("RGB", (left + len(strides) * (pw + 8), top + len(rows) * (ph + 8) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    for j, stride in enumerate(strides):
        maps = [np.asarray(fig["maps"][j], dtype=np.float64) for _, fig in rows]
        vmax = max(float(m.max()) for m in maps) or 1.0
        draw.text((left + j * (pw + 8), 2), f"P{stride.bit_length() - 1} (/{stride}), max {vmax:.3g}", fill=(0, 0, 0),
                  font=font)  # fmt: skip
        for i, m in enumerate(maps):
            cells = m.shape
            # The map's cells cover the padded canvas (multiples of the stride); crop to the image's part.
            canvas = Image.fromarray(heat_colour(m / vmax)).resize(
                (cells[1] * stride, cells[0] * stride), Image.Resampling.NEAREST
            )
            heat = canvas.crop((0, 0, w, h)).resize((pw, ph), Image.Resampling.NEAREST)
            out.paste(Image.blend(photo, heat, 0.6), (left + j * (pw + 8), top + i * (ph + 8)))
    for i, (name, _) in enumerate(rows):
        draw.text((4, top + i * (ph + 8) + ph // 2 - 7), name, fill=(0, 0, 0), font=font)
    return out

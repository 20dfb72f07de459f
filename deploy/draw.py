"""Detections drawn on an image with Pillow: the one drawing function of the project (``ldd detect --draw``,
``python -m deploy predict --draw`` and the web UI use it). Torch-free, and no ONNX Runtime either."""

from __future__ import annotations

import colorsys
import io
import os
from collections.abc import Sequence
from typing import Any

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

"""Detections drawn on an image with Pillow (torch-free; ``python -m deploy predict --draw`` and
``ldd detect --draw`` use it)."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont


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
    image: Image.Image, detections: Sequence[dict[str, Any]], *, min_score: float = 0.0,
) -> Image.Image:
    """A copy of ``image`` (RGB) with each detection's box and ``"class_name score"`` label.

    ``detections`` are ``{"box": [x1, y1, x2, y2], "score", "label", "class_name"}`` in the image's pixels,
    as ``deploy.runtime.Predictor.predict`` returns them.
    """
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    side = min(out.size)
    line = max(1, side // 250)
    font = _font(max(10, side // 40))
    for det in sorted(detections, key=lambda d: d["score"]):  # best on top
        if det["score"] < min_score:
            continue
        colour = label_colour(int(det["label"]))
        x1, y1, x2, y2 = (float(v) for v in det["box"])
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        text = f"{det.get('class_name', det['label'])} {det['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        ty = y1 - th - 2 * line if y1 - th - 2 * line >= 0 else y1  # above the box, or inside at the top
        draw.rectangle((x1, ty, x1 + tw + 2 * line, ty + th + 2 * line), fill=colour)
        draw.text((x1 + line - left, ty + line - top), text, fill=(0, 0, 0), font=font)
    return out

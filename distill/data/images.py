"""Images as training and serving read them: decoding with the EXIF orientation, mmdetection's keep-ratio
resize, the per-channel normalisation and its constants, and a cheap check that a file decodes.

Torch-free (numpy, Pillow): the API checks uploaded images with it and the ONNX runtime prepares images
with ``MEAN``, ``STD``, ``read_image`` and ``resize_image`` from here, exactly as training does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps

# mmdetection's GFL preprocessing (RGB, 0-255 scale), so mmdetection checkpoints see what they expect.
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)

_EXIF_ORIENTATION = 0x0112


def read_image(src: str | os.PathLike[str] | IO[bytes] | Image.Image) -> Image.Image:
    """Decode an image file (or take a PIL image), apply its EXIF orientation, convert to RGB."""
    image = src if isinstance(src, Image.Image) else Image.open(src)
    return ImageOps.exif_transpose(image).convert("RGB")


def rescale_size(width: int, height: int, image_size: tuple[int, int]) -> tuple[int, int, float]:
    """mmdetection's keep-ratio rule: ``scale = min(long_max / long_side, short_max / short_side)``.

    ``image_size`` is ``(long_max, short_max)`` in either order, e.g. ``(1333, 800)``; neither limit is
    exceeded. Returns ``(new_width, new_height, scale)`` with sides rounded as mmdetection does.
    """
    long_max, short_max = max(image_size), min(image_size)
    scale = min(long_max / max(width, height), short_max / min(width, height))
    return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5)), scale


def resize_image(image: Image.Image, image_size: tuple[int, int]) -> tuple[Image.Image, tuple[float, float]]:
    """Keep-ratio resize (``rescale_size``) with bilinear filtering. Returns the image and the exact
    per-axis factors ``(new_w / w, new_h / h)``: multiply boxes by them, divide predictions by them."""
    w, h = image.size
    new_w, new_h, _ = rescale_size(w, h, image_size)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    return image, (new_w / w, new_h / h)


def normalize_image(image: Image.Image) -> np.ndarray:
    """RGB image -> ``(3, H, W)`` float32, ``(pixel - MEAN) / STD`` per channel on the 0-255 scale."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    pixels = (pixels - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


class ImageTooLarge(ValueError):
    """An image file with more pixels than the service accepts (decodable, but refused)."""


def probe_image(path: Path, max_pixels: int | None) -> tuple[int, int]:
    """EXIF-oriented ``(width, height)`` of an image file, after decoding it cheaply (JPEGs at 1/8 scale)
    so truncated or corrupt files are caught. Raises :class:`ImageTooLarge` beyond ``max_pixels``, and
    Pillow's own errors (``OSError`` and others) for a damaged file."""
    with Image.open(path) as im:
        w, h = im.size
        if max_pixels is not None and w * h > max_pixels:
            raise ImageTooLarge(f"{w}x{h} exceeds the limit of {max_pixels} pixels")
        if im.getexif().get(_EXIF_ORIENTATION) in (5, 6, 7, 8):
            w, h = h, w
        im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
        im.load()
    return w, h

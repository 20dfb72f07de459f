"""Detections from an exported model with ONNX Runtime or OpenVINO (``deploy.backends``). Never imports torch
(the serving image has none).

Images go through the training pipeline's own torch-free preprocessing (``distill.data.images``):
EXIF orientation, RGB, keep-ratio resize to the model's ``input_size``, ``(pixel - MEAN) / STD``; then
they are zero-padded at the bottom and right into one ``(N, 3, H, W)`` batch (H, W multiples of 32) and
run in a single session call. Boxes come back in each image's original pixels.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from deploy.backends import DEFAULT_BACKEND, make_session, select_providers
from deploy.precision import OPENVINO_PRECISION, check_cpu
from deploy.registry import read_verified
from distill.data.images import normalize_image, read_image, resize_image

# 40 megapixels: a 8000x5000 photo passes, a decompression bomb does not.
DEFAULT_MAX_PIXELS = 40_000_000
SIZE_DIVISOR = 32

ImageInput = bytes | bytearray | memoryview | Image.Image | np.ndarray


class ImageError(ValueError):
    """An input image that cannot be used: undecodable, empty, or over the pixel limit."""


# ----------------------------------------------------------------------------------------------- images


def load_image(src: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> Image.Image:
    """Bytes of an image file, a PIL image or an ``(H, W[, 3|4])`` uint8 RGB(A) array -> an RGB PIL image,
    EXIF orientation applied. Raises ``ImageError`` with a message naming ``name`` and the reason."""
    if isinstance(src, np.ndarray):
        return _from_array(src, max_pixels, name)
    if isinstance(src, bytes | bytearray | memoryview):
        data = bytes(src)
        if not data:
            raise ImageError(f"{name}: empty file (0 bytes)")
        try:
            with warnings.catch_warnings():
                # Our own pixel limit applies below; Pillow's error for giant headers is still caught.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ImageError(f"{name}: image dimensions are too large ({e})") from None
        except Exception as e:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise ImageError(f"{name}: not a decodable image ({type(e).__name__}: {e})") from None
    elif isinstance(src, Image.Image):
        image = src
    else:
        raise ImageError(
            f"{name}: unsupported input type {type(src).__name__}; give image bytes, a PIL image or a uint8 array"
        )
    # The header's size is checked before any pixel is decoded: a decompression bomb never expands.
    _check_size(image.width, image.height, max_pixels, name)
    try:
        image.load()
        return read_image(image)
    except Exception as e:
        raise ImageError(f"{name}: the image data is corrupt or truncated ({type(e).__name__}: {e})") from None


def _check_size(width: int, height: int, max_pixels: int, name: str) -> None:
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: empty image ({width}x{height} pixels)")
    if width * height > max_pixels:
        raise ImageError(f"{name}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")


def _from_array(array: np.ndarray, max_pixels: int, name: str) -> Image.Image:
    if array.dtype != np.uint8:
        raise ImageError(f"{name}: arrays must be uint8 RGB, got dtype {array.dtype}")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise ImageError(f"{name}: arrays must be (H, W), (H, W, 3) or (H, W, 4), got shape {array.shape}")
    _check_size(array.shape[1], array.shape[0], max_pixels, name)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(np.ascontiguousarray(array)).convert("RGB")


def prepare_batch(
    images: Sequence[Image.Image], input_size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float]]]:
    """RGB images -> ``batch (N, 3, H, W)`` float32 normalised and zero-padded to multiples of 32,
    ``sizes (N, 2)`` float32 ``(h, w)`` of each resized image inside the padding, and per image the exact
    resize factors ``(sx, sy)`` (divide predicted x by sx, y by sy to get original pixels)."""
    if not images:
        raise ValueError("no images")
    tensors, factors = [], []
    for image in images:
        resized, factor = resize_image(image if image.mode == "RGB" else image.convert("RGB"), input_size)
        tensors.append(normalize_image(resized))
        factors.append(factor)
    hp = math.ceil(max(t.shape[1] for t in tensors) / SIZE_DIVISOR) * SIZE_DIVISOR
    wp = math.ceil(max(t.shape[2] for t in tensors) / SIZE_DIVISOR) * SIZE_DIVISOR
    batch = np.zeros((len(tensors), 3, hp, wp), dtype=np.float32)
    sizes = np.zeros((len(tensors), 2), dtype=np.float32)
    for i, t in enumerate(tensors):
        batch[i, :, : t.shape[1], : t.shape[2]] = t
        sizes[i] = t.shape[1:]
    return batch, sizes, factors


# -------------------------------------------------------------------------------------------- predictor


def best_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, then CPU."""
    return select_providers(None, ort.get_available_providers())


class Predictor:
    """A session (``deploy.backends``: ONNX Runtime by default, or OpenVINO) over an exported model folder
    (``model.onnx`` + ``model.json``).

    The sha256 of ``model.onnx`` is checked against model.json before the session is created
    (``deploy.registry.ModelIntegrityError`` otherwise). ``predict`` is safe to call from several threads.
    ``backend`` and ``providers`` say what serves the model.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        backend: str = DEFAULT_BACKEND,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        session_config: dict[str, str] | None = None,
    ):
        self.model_dir = Path(model_dir)
        # The verified bytes are the ones the session is built from: no window for the file to change
        # between the hash check and the load.
        self.meta, data = read_verified(self.model_dir)
        self.classes: list[str] = list(self.meta["classes"])
        self.input_size = (int(max(self.meta["input_size"])), int(min(self.meta["input_size"])))
        self.max_pixels = max_pixels
        # A bf16 model runs only where the CPU has bf16, and only on OpenVINO (ONNX Runtime has no bf16 CPU kernels).
        precision = self.meta.get("precision")
        if precision in OPENVINO_PRECISION:
            check_cpu(self.meta)
            backend = "openvino"
        self.session = make_session(
            data,
            precision=OPENVINO_PRECISION.get(precision or "", "f32"),
            backend=backend,
            providers=providers,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads,
            session_config=session_config,
        )
        self.backend: str = self.session.backend
        self.providers: list[str] = self.session.providers

    def load(self, images: Sequence[ImageInput]) -> list[Image.Image]:
        """Decode and check every image first, so a bad one fails the call before any compute."""
        return [load_image(im, self.max_pixels, name=f"image {i}") for i, im in enumerate(images)]

    def run(self, batch: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The bare session call: ``boxes (N, K, 4)``, ``scores (N, K)``, ``labels (N, K)``,
        ``num_detections (N,)`` in padded-input pixels."""
        return self.session.run(batch, sizes)

    def predict(self, images: Sequence[ImageInput]) -> list[list[dict[str, Any]]]:
        """Detections per image, ``[{"box": [x1, y1, x2, y2], "score", "label", "class_name"}]`` sorted by
        score, boxes in original image pixels. Every image is decoded and checked first (``load``), then all
        go through one session call."""
        return self.predict_loaded(self.load(images))

    def predict_loaded(self, images: Sequence[Image.Image]) -> list[list[dict[str, Any]]]:
        """:meth:`predict` for images that :func:`load_image` returned already (RGB, EXIF orientation
        applied, size checked): the API decodes each request's image once, before it joins a batch."""
        if not images:
            return []
        batch, sizes, factors = prepare_batch(images, self.input_size)
        boxes, scores, labels, num = self.run(batch, sizes)
        results = []
        for i, (image, (sx, sy)) in enumerate(zip(images, factors, strict=True)):
            k = int(num[i])
            b = boxes[i, :k].astype(np.float64) / np.array([sx, sy, sx, sy])
            b = np.minimum(b, [image.width, image.height, image.width, image.height])
            results.append(
                [
                    {
                        "box": [float(v) for v in box],
                        "score": float(s),
                        "label": int(lab),
                        "class_name": self.classes[int(lab)] if 0 <= int(lab) < len(self.classes) else str(int(lab)),
                    }
                    for box, s, lab in zip(b, scores[i, :k], labels[i, :k], strict=True)
                ]
            )
        return results

"""The torch-free side of deploy: image loading and its refusals, batching, drawing, import hygiene."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deploy.draw import draw_detections
from deploy.runtime import DEFAULT_MAX_PIXELS, ImageError, load_image, prepare_batch
from distill.data.images import MEAN, STD

ROOT = Path(__file__).resolve().parents[1]


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kwargs)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int, height: int, pixels: bool = True) -> bytes:
    """A grayscale PNG of ``width x height`` zero pixels (deflate shrinks them to a few hundred KB), or
    with ``pixels=False`` only its header."""
    z = zlib.compressobj(1)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush() if pixels else b""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def test_runtime_imports_and_prepares_images_where_torch_cannot_be_imported():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "try:\n    import torch\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('torch importable')\n"
        "import deploy.runtime, deploy.registry, deploy.draw, deploy.__main__\n"
        "from deploy.runtime import load_image, prepare_batch\n"
        "from PIL import Image\n"
        "b, s, f = prepare_batch([load_image(Image.new('RGB', (50, 40)))], (320, 256))\n"
        "assert b.shape == (1, 3, 256, 320), b.shape\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision') and sys.modules[m]]\n"
        "print('ok')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_zero_byte_image():
    with pytest.raises(ImageError, match="empty file"):
        load_image(b"")


def test_corrupt_image():
    with pytest.raises(ImageError, match="not a decodable image"):
        load_image(b"GIF89a this is not really a gif" * 10)
    data = bytearray(png_bytes(Image.new("RGB", (64, 64), (10, 200, 30))))
    data[60:80] = b"\xff" * 20  # inside the compressed pixel data: header fine, pixels not
    with pytest.raises(ImageError, match="corrupt|not a decodable"):
        load_image(bytes(data))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(fmt):
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(buf, format=fmt)
    data = buf.getvalue()
    assert load_image(data).size == (160, 120)
    with pytest.raises(ImageError, match="truncated"):
        load_image(data[: len(data) // 2])


def test_huge_dimensions_are_refused_before_decoding():
    bomb = bomb_png(8000, 8000)  # 64 megapixels of zeros in a few hundred KB
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageError, match=f"8000x8000 = 64000000 pixels exceeds the limit of {DEFAULT_MAX_PIXELS}"):
        load_image(bomb)
    with pytest.raises(ImageError, match="exceeds the limit of 1000"):
        load_image(png_bytes(Image.new("RGB", (40, 30))), max_pixels=1000)
    # A header claiming 10^10 pixels (Pillow's own bomb guard trips first): still an ImageError.
    header_only = bomb_png(100_000, 100_000, pixels=False)
    with pytest.raises(ImageError, match="too large|exceeds"):
        load_image(header_only)


def test_arrays_and_pil_images():
    assert load_image(np.zeros((30, 40, 3), np.uint8)).size == (40, 30)
    assert load_image(np.zeros((30, 40), np.uint8)).mode == "RGB"
    assert load_image(Image.new("RGBA", (5, 6))).mode == "RGB"
    with pytest.raises(ImageError, match="uint8"):
        load_image(np.zeros((30, 40, 3), np.float32))
    with pytest.raises(ImageError, match="empty image"):
        load_image(np.zeros((0, 40, 3), np.uint8))
    with pytest.raises(ImageError, match="shape"):
        load_image(np.zeros((30, 40, 2), np.uint8))
    with pytest.raises(ImageError, match="unsupported input type"):
        load_image("a/path.png")  # type: ignore[arg-type]


def test_prepare_batch_resizes_normalises_and_pads():
    a = Image.new("RGB", (640, 480), (123, 116, 103))  # about the mean colour
    b = Image.new("RGB", (100, 200), (255, 255, 255))
    batch, sizes, factors = prepare_batch([a, b], (320, 256))
    # a: scale min(320/640, 256/480) = 0.5 -> 320x240; b: min(320/200, 256/100) = 1.6 -> 160x320
    assert sizes.tolist() == [[240, 320], [320, 160]]
    assert batch.shape == (2, 3, 320, 320) and batch.dtype == np.float32
    assert factors[0] == (0.5, 0.5) and factors[1] == (1.6, 1.6)
    expected_b = (255 - np.array(MEAN)) / np.array(STD)
    assert np.allclose(batch[1, :, :320, :160], expected_b[:, None, None], atol=1e-5)
    assert (batch[1, :, :, 160:] == 0).all() and (batch[0, :, 240:, :] == 0).all()  # padding = mean colour
    assert np.abs(batch[0, :, :240, :320]).max() < 0.02


def test_draw_marks_boxes_and_keeps_size():
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    dets = [
        {"box": [10, 10, 90, 60], "score": 0.9, "label": 0, "class_name": "cat"},
        {"box": [100, 20, 190, 90], "score": 0.3, "label": 1, "class_name": "dog"},
    ]
    out = draw_detections(image, dets, min_score=0.5)
    assert out.size == image.size and image.getpixel((10, 30)) == (255, 255, 255)
    assert out.getpixel((10, 30)) != (255, 255, 255)  # left edge of the kept box
    assert out.getpixel((100, 60)) == (255, 255, 255)  # the low-score box was skipped


def test_draw_takes_bytes_or_a_path_decoded_as_the_runtime_decodes(tmp_path: Path):
    """The CLI hands a path, an upload hands bytes: both get the EXIF orientation the runtime applied, so the
    boxes it found land on the same pixels."""
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise: portrait
    buf = io.BytesIO()
    Image.new("RGB", (80, 40), (255, 255, 255)).save(buf, format="JPEG", exif=exif.tobytes())
    data = buf.getvalue()
    (tmp_path / "photo.jpg").write_bytes(data)
    dets = [{"box": [2, 50, 30, 70], "score": 0.9, "label": 0, "class_name": "cat"}]
    decoded = load_image(data)
    assert decoded.size == (40, 80)
    for source in (data, tmp_path / "photo.jpg", str(tmp_path / "photo.jpg"), decoded):
        out = draw_detections(source, dets)
        assert out.size == (40, 80) and out.mode == "RGB", source
        assert out.getpixel((2, 60)) != (255, 255, 255)  # the box's left edge, inside the portrait image
    assert decoded.getpixel((2, 60)) == (255, 255, 255)  # drawing made a copy


def test_ground_truth_is_drawn_without_a_score() -> None:
    from PIL import Image

    from deploy.draw import draw_detections

    image = Image.new("RGB", (120, 90), (255, 255, 255))
    gt = [{"box": [10, 30, 60, 80], "score": None, "label": 0, "class_name": "cell"}]
    drawn = draw_detections(image, gt, min_score=0.5)  # a threshold never hides ground truth
    assert drawn.getpixel((10, 55)) != (255, 255, 255)  # the box's left edge
    assert image.getpixel((10, 55)) == (255, 255, 255)  # the input is not changed

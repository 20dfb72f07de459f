"""The synthetic benchmark set: real handwritten digits with soft edges on cluttered backgrounds.

Each object is one of scikit-learn's bundled 8x8 handwritten digits (no download), upscaled with bicubic
interpolation to 16-120 px, slightly rotated, blurred, given a random contrast and opacity and a colour,
and pasted on a textured background (gradient, smooth colour blobs, lines/arcs/shapes as clutter, pixel
noise). Several digits per image; later digits may cover earlier ones, but never more than
``max_occlusion`` of an earlier digit's ink. The box is the tight extent of the digit's *visible* ink
(opacity at least half its peak, after occlusion), so its edges are genuinely ambiguous: the setting in
which localization distillation helps.

Train and validation images use disjoint handwriting samples (every fifth sample goes to validation).
Deterministic: the same arguments give byte-identical PNGs and ``annotations.json``. Torch-free.

    python -m distill.data.synthetic OUT_DIR [--train N] [--val N] [--size W H] [--seed S]
"""

from __future__ import annotations

import argparse
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from distill.data.annotations import write_coco

INK_THRESHOLD = 0.5  # visible ink = opacity >= this fraction of the digit's peak opacity
MIN_CONTRAST = 110.0  # RGB distance between a digit's colour and the background under it


@functools.cache
def _digit_pools() -> dict[str, list[list[np.ndarray]]]:
    """``{"train"|"val": [samples of digit d as (8, 8) float32 in [0, 1] for d in 0..9]}``."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn, read from disk

    digits = load_digits()
    pools: dict[str, list[list[np.ndarray]]] = {"train": [[] for _ in range(10)], "val": [[] for _ in range(10)]}
    for n, (img, d) in enumerate(zip(digits.images, digits.target, strict=True)):
        pools["val" if n % 5 == 0 else "train"][int(d)].append((img / 16.0).astype(np.float32))
    return pools


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Gradient + smooth colour blobs + clutter strokes and shapes, as an RGB image."""
    # A linear gradient and random colour blobs, both on a coarse grid: one bicubic upscale gives both.
    gh, gw = int(rng.integers(3, 9)), int(rng.integers(3, 9))
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.linspace(0, 1, gw) * np.cos(angle) + np.linspace(0, 1, gh)[:, None] * np.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    k = rng.uniform(0.2, 0.6)
    grid = (c0 + (c1 - c0) * t[..., None]) * (1 - k) + rng.uniform(0, 255, (gh, gw, 3)) * k
    base = Image.fromarray(grid.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC).convert("RGBA")

    overlay = Image.new("RGBA", (w, h), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for _ in range(int(rng.integers(4, 14))):
        colour = (*(int(v) for v in rng.integers(0, 256, 3)), int(rng.integers(60, 220)))
        x1, x2 = sorted(int(v) for v in rng.integers(-w // 4, w + w // 4, 2))
        y1, y2 = sorted(int(v) for v in rng.integers(-h // 4, h + h // 4, 2))
        width = int(rng.integers(1, 5))
        kind = rng.integers(4)
        if kind == 0:
            draw.line([(x1, y1), (x2, y2)] if rng.random() < 0.5 else [(x1, y2), (x2, y1)], colour, width)
        elif kind == 1:
            start = float(rng.uniform(0, 360))
            draw.arc([x1, y1, x2, y2], start, start + float(rng.uniform(60, 300)), colour, width)
        elif kind == 2:
            draw.ellipse([x1, y1, x2, y2], fill=colour if rng.random() < 0.5 else None, outline=colour, width=width)
        else:
            draw.rectangle([x1, y1, x2, y2], fill=colour if rng.random() < 0.5 else None, outline=colour, width=width)
    return Image.alpha_composite(base, overlay).convert("RGB")


def _digit_alpha(rng: np.random.Generator, sample: np.ndarray, size: int) -> np.ndarray:
    """Opacity map ``(h, w)`` in [0, 1] of one digit about ``size`` px tall with soft, blurred edges."""
    w = max(4, round(size * rng.uniform(0.75, 1.15)))
    a = Image.fromarray((sample * 255).astype(np.uint8)).resize((w, size), Image.Resampling.BICUBIC)
    a = a.rotate(float(rng.uniform(-15, 15)), Image.Resampling.BILINEAR, expand=True)
    a = a.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.0, 0.04)) * size))
    alpha = np.asarray(a, dtype=np.float32) / 255.0
    lo, hi = rng.uniform(0.0, 0.25), rng.uniform(0.55, 1.0)  # random stroke weight and edge contrast
    return np.clip((alpha - lo) / (hi - lo), 0.0, 1.0) * rng.uniform(0.75, 1.0)


def _compose(
    rng: np.random.Generator,
    pool: list[list[np.ndarray]],
    digits: list[int],
    w: int,
    h: int,
    n_objects: int,
    min_size: int,
    max_size: int,
    max_occlusion: float,
) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """One image ``(h, w, 3)`` uint8 and its objects ``(digit index, [x, y, w, h])``."""
    canvas = np.asarray(_background(rng, w, h), dtype=np.float32).copy()
    # Per pasted digit: [label, x0, y0, opacity still visible (ph, pw), ink threshold, ink pixels at paste].
    pasted: list[tuple[int, int, int, np.ndarray, float, int]] = []
    top = min(max_size, int(0.8 * min(w, h)))
    for _ in range(n_objects):
        k = int(rng.integers(len(digits)))
        samples = pool[digits[k]]
        size = int(round(np.exp(rng.uniform(np.log(min_size), np.log(max(min_size, top))))))
        alpha = _digit_alpha(rng, samples[int(rng.integers(len(samples)))], size)
        ph, pw = alpha.shape
        thr = INK_THRESHOLD * float(alpha.max())
        if ph > h or pw > w or thr <= 0:
            continue
        for _attempt in range(20):
            x0, y0 = int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))
            if all(_ink_left(p, x0, y0, alpha) >= (1 - max_occlusion) * p[5] for p in pasted):
                break
        else:
            continue  # no placement keeps the earlier digits visible enough
        region = canvas[y0 : y0 + ph, x0 : x0 + pw]
        under = region[alpha >= thr].mean(0)
        for _attempt in range(10):
            colour = rng.uniform(0, 255, 3)
            if np.linalg.norm(colour - under) >= MIN_CONTRAST:
                break
        else:
            colour = np.where(under > 127, 0.0, 255.0)
        region[:] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
        for p in pasted:
            _occlude(p, x0, y0, alpha)
        pasted.append((k, x0, y0, alpha.copy(), thr, int((alpha >= thr).sum())))

    objects = []
    for k, x0, y0, vis, thr, _ in pasted:
        ys, xs = np.nonzero(vis >= thr)
        if len(xs):
            x1, y1 = x0 + int(xs.min()), y0 + int(ys.min())
            objects.append((k, [float(x1), float(y1), float(x0 + xs.max() + 1 - x1), float(y0 + ys.max() + 1 - y1)]))
    noise = rng.integers(-1000, 1001, canvas.shape[:2] + (1,), dtype=np.int16) * np.float32(rng.uniform(0.004, 0.012))
    return np.clip(canvas + noise + 0.5, 0, 255).astype(np.uint8), objects


def _overlap(p: tuple, x0: int, y0: int, alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Views of an earlier digit's visible opacity and the new ``alpha`` where the two patches overlap."""
    _, px, py, vis, _, _ = p
    xa, ya = max(px, x0), max(py, y0)
    xb, yb = min(px + vis.shape[1], x0 + alpha.shape[1]), min(py + vis.shape[0], y0 + alpha.shape[0])
    if xa >= xb or ya >= yb:
        return vis[:0, :0], alpha[:0, :0]
    return vis[ya - py : yb - py, xa - px : xb - px], alpha[ya - y0 : yb - y0, xa - x0 : xb - x0]


def _ink_left(p: tuple, x0: int, y0: int, alpha: np.ndarray) -> int:
    """Ink pixels an earlier digit ``p`` keeps if ``alpha`` is pasted over it at ``(x0, y0)``."""
    vis, a = _overlap(p, x0, y0, alpha)
    thr = p[4]
    return int((p[3] >= thr).sum() - (vis >= thr).sum() + (vis * (1 - a) >= thr).sum())


def _occlude(p: tuple, x0: int, y0: int, alpha: np.ndarray) -> None:
    vis, a = _overlap(p, x0, y0, alpha)
    vis *= 1 - a


def make_synthetic(
    out_dir: str | os.PathLike[str],
    *,
    num_train: int = 160,
    num_val: int = 40,
    image_size: tuple[int, int] = (320, 256),
    min_objects: int = 1,
    max_objects: int = 6,
    min_size: int = 16,
    max_size: int = 120,
    num_classes: int = 10,
    max_occlusion: float = 0.4,
    seed: int = 0,
) -> Path:
    """Write the synthetic set to ``out_dir`` (``images/*.png`` + ``annotations.json`` with train/val
    ``split``) and return ``out_dir``. ``image_size`` is ``(W, H)``; classes are the digits
    ``0..num_classes-1`` named ``"0"``, ``"1"``, ...; each image gets ``min_objects..max_objects`` digits
    (fewer when no placement respects ``max_occlusion``) of height ``min_size..max_size`` px."""
    if not 1 <= num_classes <= 10:
        raise ValueError("num_classes must be within 1..10")
    if not 1 <= min_objects <= max_objects:
        raise ValueError("need 1 <= min_objects <= max_objects")
    if not 4 <= min_size <= max_size:
        raise ValueError("need 4 <= min_size <= max_size")
    w, h = image_size
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    digits = list(range(num_classes))
    pools = _digit_pools()

    def one(job: tuple[str, int, int]) -> list[tuple[int, list[float]]]:
        split, split_code, j = job
        rng = np.random.default_rng([seed, split_code, j])  # per image: independent of the other counts
        n_objects = int(rng.integers(min_objects, max_objects + 1))
        pixels, objects = _compose(rng, pools[split], digits, w, h, n_objects, min_size, max_size, max_occlusion)
        Image.fromarray(pixels).save(out / f"images/{split}_{j:05d}.png", compress_level=1)
        return objects

    jobs = [("train", 0, j) for j in range(num_train)] + [("val", 1, j) for j in range(num_val)]
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    # numpy, Pillow's filters and the PNG encoder release the GIL: threads use every core, order is kept.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for (split, _, j), objects in zip(jobs, pool.map(one, jobs), strict=True):
            image_id = len(images) + 1
            images.append(
                {"id": image_id, "file_name": f"images/{split}_{j:05d}.png", "width": w, "height": h, "split": split}
            )
            for k, box in objects:
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": k + 1,
                        "bbox": box,
                        "area": box[2] * box[3],
                        "iscrowd": 0,
                    }
                )
    categories = [{"id": k + 1, "name": str(d)} for k, d in enumerate(digits)]
    write_coco({"images": images, "annotations": annotations, "categories": categories}, out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m distill.data.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--train", type=int, default=160)
    p.add_argument("--val", type=int, default=40)
    p.add_argument("--size", type=int, nargs=2, default=(320, 256), metavar=("W", "H"))
    p.add_argument("--min-objects", type=int, default=1)
    p.add_argument("--max-objects", type=int, default=6)
    p.add_argument("--classes", type=int, default=10, help="digits 0..N-1")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = make_synthetic(
        a.out_dir,
        num_train=a.train,
        num_val=a.val,
        image_size=tuple(a.size),
        min_objects=a.min_objects,
        max_objects=a.max_objects,
        num_classes=a.classes,
        seed=a.seed,
    )
    print(f"wrote {a.train} train + {a.val} val images to {out}")


if __name__ == "__main__":
    main()

"""The synthetic digit set: deterministic, sane boxes, several objects, every class, soft box edges."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distill.data import synthetic as synthetic_module
from distill.data.annotations import load_coco, split
from distill.data.synthetic import make_synthetic

ARGS = {"num_train": 24, "num_val": 6, "image_size": (160, 128), "max_size": 60, "seed": 7}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn") / "a", **ARGS)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(synthetic: Path, tmp_path: Path) -> None:
    again = make_synthetic(tmp_path / "b", **ARGS)
    first, second = _files(synthetic), _files(again)
    assert len(first) == 24 + 6 + 1 and first == second
    other = _files(make_synthetic(tmp_path / "c", **{**ARGS, "seed": 8}))
    assert other.keys() == first.keys() and other["annotations.json"] != first["annotations.json"]
    assert sum(other[k] != first[k] for k in first) == len(first)


def test_sanity(synthetic: Path) -> None:
    data = load_coco(synthetic)
    assert data.problems == []
    assert data.classes == [str(d) for d in range(10)]
    train, val = split(data, 0.5, seed=0)
    assert (len(train), len(val)) == (24, 6)
    counts = []
    seen = set()
    overlaps = 0
    for image_id in data.image_ids:
        info = data.image(image_id)
        assert (info["width"], info["height"]) == (160, 128)
        boxes, labels = data.boxes(image_id)
        counts.append(len(boxes))
        seen |= set(labels.tolist())
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 160).all() and (boxes[:, 3] <= 128).all()
        assert (boxes[:, 2:] - boxes[:, :2] >= 4).all()
        lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
        rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
        inter = np.clip(rb - lt, 0, None).prod(-1)
        overlaps += int((np.triu(inter, 1) > 0).any())
    assert seen == set(range(10))  # every class appears
    assert 1 <= min(counts) and max(counts) >= 4 and np.mean(counts) >= 2.5  # several objects per image
    assert overlaps >= 3  # some digits overlap


def test_box_is_the_visible_ink_with_soft_edges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a flat grey background (a real image otherwise), one digit per image: its box is the extent of
    the pixels at least half as far from the grey as the digit's strongest pixel, and its edges are ramps
    of intermediate values, not hard steps."""
    monkeypatch.setattr(synthetic_module, "_background", lambda rng, w, h: Image.new("RGB", (w, h), (128,) * 3))
    data = load_coco(
        make_synthetic(
            tmp_path,
            num_train=12,
            num_val=0,
            image_size=(128, 128),
            min_objects=1,
            max_objects=1,
            min_size=30,
            max_size=90,
            seed=3,
        )
    )
    for image_id in data.image_ids:
        pixels = np.asarray(Image.open(data.image(image_id)["path"]), dtype=np.float32)
        diff = np.abs(pixels - 128).max(-1)
        ((x1, y1, x2, y2),) = data.boxes(image_id)[0].astype(int)
        peak = diff.max()
        ys, xs = np.nonzero(diff >= 0.5 * peak)
        # the noise (at most +-12 grey levels) moves the half-peak contour by a pixel or two
        assert abs(xs.min() - x1) <= 2 and abs(ys.min() - y1) <= 2, (image_id, xs.min(), ys.min(), x1, y1)
        assert abs(xs.max() + 1 - x2) <= 2 and abs(ys.max() + 1 - y2) <= 2, (image_id, xs.max(), ys.max(), x2, y2)
        soft = ((diff > 0.15 * peak) & (diff < 0.85 * peak)).sum()
        assert soft >= 0.2 * (diff >= 0.85 * peak).sum()  # many intermediate pixels: blurred, ambiguous edges


def test_fewer_classes_and_objects(tmp_path: Path) -> None:
    data = load_coco(
        make_synthetic(
            tmp_path,
            num_train=8,
            num_val=2,
            image_size=(96, 96),
            num_classes=3,
            min_objects=1,
            max_objects=2,
            max_size=40,
            seed=1,
        )
    )
    assert data.classes == ["0", "1", "2"]
    assert all(1 <= len(data.annotations[i]) <= 2 for i in data.image_ids)
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic(tmp_path, num_classes=11)


def test_command_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill.data.synthetic",
            str(tmp_path / "cli"),
            "--train",
            "3",
            "--val",
            "2",
            "--size",
            "96",
            "64",
            "--seed",
            "4",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert "3 train + 2 val" in out.stdout
    data = load_coco(tmp_path / "cli")
    assert len(data.images) == 5 and data.image(1)["width"] == 96 and data.image(1)["height"] == 64

"""COCO JSON datasets: reading with validation (of the JSON, the image files and the boxes), splitting,
writing.

A dataset is a folder ``DIR`` with ``DIR/annotations.json`` (COCO: ``images``, ``annotations``,
``categories``; an image may carry ``"split": "train" | "val" | "test"``) and its images under ``DIR``. Optional
top-level lists (not COCO) hold what was found when the file was made, e.g. by the VOC import, and ``load_coco``
reports them again: ``"problems"`` (data that is wrong: an upload with any is refused) and ``"warnings"``
(things handled on the way, such as a degenerate box dropped: reported, the dataset stays usable).

Torch-free (json, numpy, Pillow): the API validates uploads with it. How images are decoded and prepared
(``MEAN``, ``STD``, ``read_image``, ``resize_image``, ...) is ``distill.data.images``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distill.data.images import ImageTooLarge, probe_image
from distill.files import atomic_write_json

# Boxes may stick out of the image by this many pixels (rounding, 0/1-based tools) without a problem line.
CLIP_TOLERANCE = 2.0
VAL_SPLIT_NAMES = frozenset({"val", "valid", "validation"})
TEST_SPLIT_NAMES = frozenset({"test"})


class DatasetError(ValueError):
    """The annotation file cannot be used at all (malformed JSON, missing keys, wrong types)."""


@dataclass
class CocoData:
    """A validated dataset. Only usable images and boxes are kept; everything dropped is in ``problems``
    (wrong data) or ``warnings`` (degenerate boxes, which are not objects; see ``degenerate_box``).

    ``images``: dicts with ``id``, ``file_name``, ``width``, ``height`` (the real, EXIF-oriented size when
    images were checked), ``split`` when given, and ``path`` (absolute). ``annotations``: image id -> its
    boxes, each with ``id``, ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]`` (clipped to the image),
    ``area``, ``iscrowd`` and ``label`` (the contiguous class index ``0..C-1``). ``classes[label]`` is the
    class name and ``category_ids[label]`` its COCO category id.
    """

    root: Path
    classes: list[str]
    category_ids: list[int]
    images: list[dict[str, Any]]
    annotations: dict[int, list[dict[str, Any]]]
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    # Images whose files cannot be decoded (truncated, corrupt), dropped: "<file>: <why>" per image. Real photo
    # sets have a few; the upload accepts the set without them up to LDD_MAX_BAD_IMAGE_FRACTION.
    damaged: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._index = {im["id"]: im for im in self.images}

    @property
    def image_ids(self) -> list[int]:
        return [im["id"] for im in self.images]

    def fingerprint(self) -> str:
        """sha256 of the classes, images (name, size, split) and boxes: equal for the same data wherever
        its folder is."""
        keep = ("id", "file_name", "width", "height", "split")
        content = {
            "classes": self.classes,
            "images": [{k: im.get(k) for k in keep} for im in self.images],
            "boxes": {str(i): [[a["label"], *a["bbox"]] for a in anns] for i, anns in sorted(self.annotations.items())},
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def image(self, image_id: int) -> dict[str, Any]:
        return self._index[image_id]

    def boxes(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Training boxes of one image, iscrowd boxes left out: ``(K, 4)`` float32 x1y1x2y2 in original
        pixels and ``(K,)`` int64 labels."""
        anns = [a for a in self.annotations.get(image_id, []) if not a["iscrowd"]]
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        xywh[:, 2:] += xywh[:, :2]
        return xywh, np.array([a["label"] for a in anns], dtype=np.int64)

    @property
    def num_boxes(self) -> int:
        """Boxes used in training (iscrowd boxes not counted)."""
        return sum(not a["iscrowd"] for anns in self.annotations.values() for a in anns)

    def ground_truth(self, image_ids: list[int] | None = None) -> dict[str, Any]:
        """A COCO dict for pycocotools over ``image_ids`` (all by default), iscrowd boxes included."""
        ids = self.image_ids if image_ids is None else list(image_ids)
        keys = ("id", "file_name", "width", "height")
        return {
            "images": [{k: self._index[i][k] for k in keys} for i in ids],
            "annotations": [
                {k: a[k] for k in ("id", "image_id", "category_id", "bbox", "area", "iscrowd")}
                for i in ids
                for a in self.annotations.get(i, [])
            ],
            "categories": [{"id": c, "name": n} for c, n in zip(self.category_ids, self.classes, strict=True)],
        }

    def summary(self) -> dict[str, Any]:
        """Counts for humans and the API: classes, images, boxes (per class), splits, problems."""
        per_class = [0] * len(self.classes)
        for anns in self.annotations.values():
            for a in anns:
                per_class[a["label"]] += not a["iscrowd"]
        splits: dict[str, int] = {}
        for im in self.images:
            if "split" in im:
                splits[im["split"]] = splits.get(im["split"], 0) + 1
        return {
            "classes": list(self.classes),
            "num_images": len(self.images),
            "num_boxes": sum(per_class),
            "boxes_per_class": dict(zip(self.classes, per_class, strict=True)),
            "splits": splits or None,
            "num_problems": len(self.problems),
            "num_warnings": len(self.warnings),
        }


# ------------------------------------------------------------------------------------------------ boxes


def degenerate_box(width: float, height: float) -> str | None:
    """Why a box of ``width x height`` (COCO, continuous pixels) marks no object, or ``None``.

    A box with no extent in an axis (a point, or a line) is not an object but a slip of the annotation tool
    (a click without a drag). Kept, it would do harm and no good: no location's centre lies inside it, so the
    assigner never gives it a positive and it trains nothing; in evaluation no detection can overlap it
    (IoU 0 with everything), so it is a ground truth no model can find, lowering every model's recall. A
    1-pixel box instead (what VOC's inclusive corners would make of it) is no better: nothing is 1 pixel
    wide. The rest of the image's annotations are fine, so the box is dropped and reported as a warning
    instead of refusing the dataset (``check_box`` refuses negative sizes: those are wrong data).
    """
    if width == 0 and height == 0:
        return "a point, not a box (no width and no height): dropped"
    if width == 0 or height == 0:
        return f"a line, not a box (no {'width' if width == 0 else 'height'}): dropped"
    return None


def check_box(bbox: Any, width: float, height: float) -> tuple[list[float] | None, str | None]:
    """Validate a COCO ``[x, y, w, h]`` box against an image of ``width x height``.

    Returns ``(box, problem)``: the box clipped to the image (``None`` when unusable) and a message when
    something is worth reporting (clipping by more than ``CLIP_TOLERANCE`` pixels, or a dropped box).
    """
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None, f"bbox {bbox!r} is not 4 numbers, dropped"
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None, f"bbox {bbox!r} is not finite, dropped"
    if w <= 0 or h <= 0:
        return None, f"bbox {bbox!r} has non-positive size, dropped"
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x2 - x1 < 1 or y2 - y1 < 1:
        return None, f"bbox {bbox!r} lies outside the image ({width}x{height}), dropped"
    stick_out = max(-x, -y, x + w - width, y + h - height)
    note = None
    if stick_out > CLIP_TOLERANCE:
        note = f"bbox {bbox!r} extends {stick_out:.1f} px outside the image ({width}x{height}), clipped"
    return [x1, y1, x2 - x1, y2 - y1], note


# ------------------------------------------------------------------------------------------------ reading


def _require(items: Any, what: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        raise DatasetError(f"'{what}' must be a list")
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise DatasetError(f"{what}[{n}] must be an object")
        missing = [k for k in keys if k not in item]
        if missing:
            raise DatasetError(f"{what}[{n}] lacks required key(s) {', '.join(missing)}")
        if "id" in keys and (not isinstance(item["id"], int) or isinstance(item["id"], bool)):
            raise DatasetError(f"{what}[{n}]: id must be an integer, got {item['id']!r}")
    return items


def _annotation_file(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise DatasetError(f"{path} does not exist")
    if (path / "annotations.json").is_file():
        return path / "annotations.json"
    candidates = sorted(path.glob("*.json"))
    if len(candidates) == 1:
        return candidates[0]
    raise DatasetError(f"{path} holds no annotations.json" + (" (and several *.json)" if candidates else ""))


def _locate(root: Path, file_name: Any) -> Path | None:
    """The image file for ``file_name``: ``root/file_name`` or ``root/images/file_name``, never outside
    ``root`` (uploads must not reach other files)."""
    if not isinstance(file_name, str) or not file_name:
        return None
    base = root.resolve()
    for candidate in (root / file_name, root / "images" / file_name):
        resolved = candidate.resolve()
        if resolved.is_relative_to(base) and resolved.is_file():
            return resolved
    return None


def load_coco(path: str | os.PathLike[str], *, check_images: bool = True, max_pixels: int | None = None) -> CocoData:
    """Read and validate a COCO dataset: a folder holding ``annotations.json``, or the JSON file itself
    (image ``file_name``s are relative to its folder, or to its ``images/`` subfolder).

    Problems are reported, not raised: missing, undecodable or (with ``max_pixels``) oversized images and
    duplicate image ids drop the image; a size in the JSON that differs from the file's is replaced by the
    real size; boxes with unknown image or category ids, duplicate ids, non-positive size or outside the
    image are dropped; boxes sticking out are clipped. Each problem line starts with the file it concerns.
    With ``check_images=False`` image files are neither opened nor required (the JSON sizes are trusted).

    Raises ``DatasetError`` when the file is not a usable COCO JSON (syntax, missing keys, wrong types).
    """
    json_path = _annotation_file(Path(path))
    root = json_path.parent
    try:
        coco = json.loads(json_path.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{json_path.name}: not valid JSON ({e})") from e
    if not isinstance(coco, dict):
        raise DatasetError(f"{json_path.name}: the top level must be an object")
    missing = [k for k in ("images", "annotations", "categories") if k not in coco]
    if missing:
        raise DatasetError(f"{json_path.name}: missing required key(s) {', '.join(missing)}")
    size_keys = () if check_images else ("width", "height")
    images = _require(coco["images"], "images", ("id", "file_name", *size_keys))
    anns = _require(coco["annotations"], "annotations", ("id", "image_id", "category_id", "bbox"))
    cats = _require(coco["categories"], "categories", ("id", "name"))
    if not cats:
        raise DatasetError(f"{json_path.name}: 'categories' is empty")
    problems, warnings, damaged = (
        [str(p) for p in coco[key]] if isinstance(coco.get(key), list) else []
        for key in ("problems", "warnings", "damaged")
    )

    label_of: dict[int, int] = {}
    classes, category_ids = [], []
    for c in sorted(cats, key=lambda c: c["id"]):
        if c["id"] in label_of:
            problems.append(f"{json_path.name}: duplicate category id {c['id']}, kept the first")
            continue
        label_of[c["id"]] = len(classes)
        classes.append(str(c["name"]))
        category_ids.append(c["id"])

    usable: dict[int, dict[str, Any]] = {}
    seen_image_ids: set[int] = set()
    for im in images:
        name = str(im["file_name"])
        if im["id"] in seen_image_ids:
            problems.append(f"{name}: duplicate image id {im['id']}, dropped")
            continue
        seen_image_ids.add(im["id"])
        entry = {k: im[k] for k in ("id", "file_name", "width", "height", "split") if k in im}
        entry["path"] = str(root / name)
        if check_images:
            file = _locate(root, im["file_name"])
            if file is None:
                problems.append(f"{name}: image file not found")
                continue
            try:
                w, h = probe_image(file, max_pixels)
            except ImageTooLarge as e:
                problems.append(f"{name}: {e}")
                continue
            except Exception as e:  # Pillow raises many types for damaged files
                damaged.append(f"{name}: cannot decode image ({type(e).__name__}: {e})")
                continue
            if (im.get("width"), im.get("height")) != (w, h) and "width" in im:
                problems.append(
                    f"{name}: size {im.get('width')}x{im.get('height')} in the JSON differs "
                    f"from the image's {w}x{h}, using the image's"
                )
            entry.update(width=w, height=h, path=str(file))
        usable[im["id"]] = entry

    grouped: dict[int, list[dict[str, Any]]] = {i: [] for i in usable}
    seen_ann_ids: set[int] = set()
    names: dict[int, str] = {}
    for im in images:
        names.setdefault(im["id"], str(im["file_name"]))  # the first of duplicate ids is the one kept
    for a in anns:
        if not isinstance(a["image_id"], int) or not isinstance(a["category_id"], int):
            raise DatasetError(f"annotation {a['id']}: image_id and category_id must be integers")
        where = f"{names.get(a['image_id'], json_path.name)}: annotation {a['id']}"
        if a["id"] in seen_ann_ids:
            problems.append(f"{where}: duplicate annotation id, dropped")
            continue
        seen_ann_ids.add(a["id"])
        if a["image_id"] not in names:
            problems.append(f"{where}: unknown image id {a['image_id']!r}, dropped")
            continue
        if a["image_id"] not in usable:
            continue  # its image was dropped and reported already
        if a["category_id"] not in label_of:
            problems.append(f"{where}: unknown category id {a['category_id']!r}, dropped")
            continue
        im = usable[a["image_id"]]
        bbox = a["bbox"]
        degenerate = degenerate_box(bbox[2], bbox[3]) if isinstance(bbox, list) and len(bbox) == 4 else None
        if degenerate:
            warnings.append(f"{where}: bbox {bbox!r} is {degenerate}")
            continue
        box, note = check_box(bbox, im["width"], im["height"])
        if note:
            problems.append(f"{where}: {note}")
        if box is None:
            continue
        grouped[im["id"]].append(
            {
                "id": a["id"],
                "image_id": im["id"],
                "category_id": a["category_id"],
                "bbox": box,
                "area": float(a.get("area") or box[2] * box[3]),
                "iscrowd": int(bool(a.get("iscrowd", 0))),
                "label": label_of[a["category_id"]],
            }
        )
    return CocoData(root, classes, category_ids, list(usable.values()), grouped, problems, warnings, damaged)


# ------------------------------------------------------------------------------------- splitting, writing


def has_own_split(data: CocoData) -> bool:
    """Whether the images' ``split`` fields name a validation or test image, so that they decide the split
    (``split``); otherwise the split is a seeded draw."""
    return any(str(im.get("split", "")).lower() in VAL_SPLIT_NAMES | TEST_SPLIT_NAMES for im in data.images)


def draw_val(image_ids: list[int], val_split: float, seed: int) -> set[int]:
    """The validation images of a seeded draw: a shuffle of the sorted ids by ``random.Random(seed)`` puts
    ``round(n * val_split)`` of them in validation, at least one in each part when ``val_split > 0`` and there
    are two images or more. Depends only on the set of ids, ``val_split`` and ``seed``."""
    n_val = round(len(image_ids) * val_split)
    if val_split > 0 and len(image_ids) >= 2:
        n_val = min(max(n_val, 1), len(image_ids) - 1)
    shuffled = sorted(image_ids)
    random.Random(seed).shuffle(shuffled)
    return set(shuffled[:n_val])


def split(data: CocoData, val_split: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(train_image_ids, val_image_ids)``.

    When images have a ``split`` field it decides, as Pascal VOC's image sets mean it:

    - ``val``/``valid``/``validation`` images validate; ``test`` images are held out (kept for benchmarks,
      never trained on, never used to pick anything) -- unless no image is ``val``, then ``test`` validates
      (a dataset split only into train and test, e.g. VOC's ``trainval`` + ``test``);
    - everything else (``train``, ``trainval``, no field) trains;
    - when the fields name no validation or test image at all, the seeded draw below is made among them.

    Otherwise ``draw_val(ids, val_split, seed)`` validates. ``seed`` is the *data set's* split seed (the
    service's ``split_seed``, fixed at upload), never a job's training seed: a training seed must not move
    images between train and validation, or a teacher and its students would validate on different images.
    Both lists keep the dataset's image order.
    """
    named = {im["id"]: str(im.get("split", "")).lower() for im in data.images}
    val = {i for i, s in named.items() if s in VAL_SPLIT_NAMES}
    test = {i for i, s in named.items() if s in TEST_SPLIT_NAMES}
    held_out: set[int] = set()
    if val:
        held_out = test
    elif test:
        val = test
    else:
        val = draw_val(data.image_ids, val_split, seed)
    return ([i for i in data.image_ids if i not in val and i not in held_out], [i for i in data.image_ids if i in val])


def split_roles(data: CocoData, val_split: float, seed: int = 0) -> dict[int, str]:
    """Image id -> ``"train"``, ``"val"`` or ``"test"`` (held out) under ``split``: what the store keeps per
    image of a data set."""
    train, val = split(data, val_split, seed)
    roles = dict.fromkeys(data.image_ids, "test")
    roles.update(dict.fromkeys(train, "train"))
    roles.update(dict.fromkeys(val, "val"))
    return roles


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes: an image's content hash, equal for the same picture in any data set."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_coco(coco: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a COCO dict to ``path`` (a ``.json`` file, or a folder that gets ``annotations.json``),
    atomically so a reader never sees half a file. Returns the file's path."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / "annotations.json"
    return atomic_write_json(path, coco, indent=None)

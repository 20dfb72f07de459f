"""A published model's accuracy as the runtime that serves it measures it: COCO AP on a data set's split.

The split is training's (``distill.data.annotations.split``: the images' own ``split`` fields, else the
seeded ``val_split`` draw), the pictures go through the predictor's own decoding and preprocessing
(``Predictor.predict_loaded``), and the scoring is training's (``distill.evaluate.coco_ap``). So an fp32
model's AP here matches the PyTorch AP of its checkpoint up to the export's tolerance, and an int8 or fp16
model's AP says what its format costs.
"""

from __future__ import annotations

import os
import random
from typing import Any

from PIL import Image

from deploy.runtime import Predictor, load_image
from distill.data.annotations import CocoData, load_coco, split


def split_images(data: CocoData, part: str, val_split: float, seed: int) -> list[dict[str, Any]]:
    """The image records of ``part`` (``train`` or ``val``) as training splits them; ``val`` falls back to
    the training images when the data set has no validation image (as training's own evaluation does)."""
    train_ids, val_ids = split(data, val_split, seed)
    ids = train_ids if part == "train" or not val_ids else val_ids
    return [data.image(i) for i in ids]


def calibration_pictures(
    dataset: str | os.PathLike, count: int, val_split: float = 0.2, seed: int = 0
) -> list[Image.Image]:
    """``count`` training pictures of ``dataset`` (a seeded draw), decoded as the runtime decodes them."""
    images = split_images(load_coco(dataset), "train", val_split, seed)
    chosen = random.Random(seed).sample(images, min(count, len(images)))
    return [load_image(open(im["path"], "rb").read(), name=str(im["path"])) for im in chosen]


def runtime_ap(
    predictor: Predictor, dataset: str | os.PathLike, val_split: float = 0.2, seed: int = 0, batch_size: int = 1
) -> dict[str, Any]:
    """COCO metrics (AP, AP50, ... on a 0-1 scale) of ``predictor`` on the validation split of ``dataset``,
    with the backend and providers that computed them.

    One picture per call by default, as ``/detect`` serves a lone request: in a padded batch a picture's
    bottom and right borders see zeros instead of the image's end, which moves its detections a little.
    """
    from distill.evaluate import coco_ap  # pycocotools: needed by the export, not by serving

    data = load_coco(dataset)
    images = split_images(data, "val", val_split, seed)
    detections = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pictures = [load_image(open(im["path"], "rb").read(), predictor.max_pixels, str(im["path"])) for im in chunk]
        for im, dets in zip(chunk, predictor.predict_loaded(pictures), strict=True):
            for d in dets:
                x1, y1, x2, y2 = d["box"]
                detections.append(
                    {
                        "image_id": im["id"],
                        "category_id": data.category_ids[d["label"]],
                        "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                        "score": d["score"],
                    }
                )
    metrics = coco_ap(data.ground_truth([im["id"] for im in images]), detections)
    return {**metrics, "images": len(images), "backend": predictor.backend, "providers": predictor.providers}

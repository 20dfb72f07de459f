"""COCO box evaluation with pycocotools: AP, AP50, AP75, APs, APm, APl."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from distill.models.detector import Detector

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def coco_ap(gt: dict, detections: list[dict]) -> dict[str, float]:
    """COCO metrics of ``detections`` ([{image_id, category_id, bbox [x, y, w, h], score}]) against a COCO
    ground-truth dict. No detections at all gives zeros, not an error."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"info": {}, **gt}
        coco_gt.createIndex()
        if not detections or not gt.get("annotations"):
            return dict.fromkeys(METRIC_NAMES, 0.0)
        coco_dt = coco_gt.loadRes(detections)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.params.imgIds = [img["id"] for img in gt["images"]]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    # -1 means "no ground truth of this size"; report 0 so the numbers stay JSON and comparable.
    return {name: float(max(v, 0.0)) for name, v in zip(METRIC_NAMES, ev.stats[:6], strict=True)}


@torch.no_grad()
def predict_dataset(model: Detector, loader: Iterable, device: torch.device) -> list[dict]:
    """Detections over a loader in COCO result format, boxes in original image pixels.

    ``category_id`` is the contiguous label (0..C-1); callers map it to the dataset's category ids.
    """
    model.eval()
    results = []
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        sizes = [tuple(t["size"]) for t in targets]
        for det, target in zip(model.predict(images, sizes), targets, strict=True):
            sx, sy = target["scale_xy"]
            boxes: Tensor = det["boxes"].float().cpu() / torch.tensor([sx, sy, sx, sy])
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).numpy()
            for box, score, label in zip(xywh, det["scores"].cpu().numpy(), det["labels"].cpu().numpy(), strict=True):
                results.append(
                    {
                        "image_id": int(target["image_id"]),
                        "category_id": int(label),
                        "bbox": [float(v) for v in np.round(box, 3)],
                        "score": float(score),
                    }
                )
    return results

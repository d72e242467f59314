"""COCO detection mAP through pycocotools, the reference implementation."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


def load_coco(path: Path | str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        return COCO(str(path))


def coco_map(gt: COCO, detections: list[dict], image_ids: list[int] | None = None) -> dict:
    """mAP@0.5 (`map50`) and mAP@[.5:.95] (`map`) of box detections.

    `detections`: dicts with image_id, category_id, bbox [x, y, w, h] and score.
    Images in `image_ids` (default: all of `gt`) with no detection count as misses.
    """
    if not detections:
        return {"map50": 0.0, "map": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(d) for d in detections])
        evaluator = COCOeval(gt, dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = np.maximum(evaluator.stats, 0.0)  # pycocotools reports -1 where nothing is defined
    return {"map50": float(stats[1]), "map": float(stats[0])}

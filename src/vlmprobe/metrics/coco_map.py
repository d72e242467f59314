"""COCO detection mAP through pycocotools, the reference implementation, with bootstrap intervals.

pycocotools matches detections to ground truth per image (`COCOeval.evaluate`); the interval
re-runs only the accumulation step (precision envelope, 101 recall points, mean over classes)
on test images resampled with replacement, which pycocotools itself cannot do (it drops repeated
image ids). `average_precision` reproduces `COCOeval.accumulate` + `summarize` exactly on the
original sample (tests/test_metrics_coco_map.py checks this).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vlmprobe.metrics.finite import require_finite

MAX_DETS = 100  # COCO's largest per-image detection budget, the one mAP is reported at


def load_coco(path: Path | str) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress chatter
        return COCO(str(path))


def evaluate(gt: COCO, detections: list[dict], image_ids: list[int] | None) -> COCOeval | None:
    """COCOeval after `evaluate()` and `accumulate()`; None when there is no detection at all."""
    if not detections:
        return None
    # pycocotools counts a NaN box as a hit (`iou < threshold` is False for NaN).
    require_finite("coco_map detections' bbox", [d["bbox"] for d in detections])
    require_finite("coco_map detections' score", [d["score"] for d in detections])
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes([dict(d) for d in detections])
        evaluator = COCOeval(gt, dt, iouType="bbox")
        if image_ids is not None:
            evaluator.params.imgIds = list(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def coco_map(gt: COCO, detections: list[dict], image_ids: list[int] | None = None) -> dict:
    """mAP@0.5 (`map50`) and mAP@[.5:.95] (`map`) of box detections.

    `detections`: dicts with image_id, category_id, bbox [x, y, w, h] and score.
    Images in `image_ids` (default: all of `gt`) with no detection count as misses.
    """
    evaluator = evaluate(gt, detections, image_ids)
    if evaluator is None:
        return {"map50": 0.0, "map": 0.0}
    stats = np.maximum(evaluator.stats, 0.0)  # pycocotools reports -1 where nothing is defined
    return {"map50": float(stats[1]), "map": float(stats[0])}


@dataclass(frozen=True)
class ClassMatches:
    """One class's detections over all images, in pycocotools' accumulation order (images in
    order, then a stable sort by descending score)."""

    image: np.ndarray  # (D,) index of each detection's image
    true_positive: np.ndarray  # (T, D) matched and not ignored, per IoU threshold
    false_positive: np.ndarray  # (T, D) unmatched and not ignored
    n_gt: np.ndarray  # (n_images,) ground-truth objects that count, per image


def class_matches(evaluator: COCOeval) -> list[ClassMatches]:
    """pycocotools' per-image match records (area 'all', at most MAX_DETS per image) gathered
    per class; classes with no ground truth at all are left out, as pycocotools does."""
    p = evaluator.params
    n_img, n_area = len(p.imgIds), len(p.areaRng)
    offset = p.areaRngLbl.index("all") * n_img
    out = []
    for k in range(len(p.catIds)):
        records = evaluator.evalImgs[k * n_area * n_img + offset : k * n_area * n_img + offset
                                     + n_img]
        n_gt = np.array([0 if r is None else int(np.count_nonzero(r["gtIgnore"] == 0))
                         for r in records])
        if n_gt.sum() == 0:
            continue
        present = [(i, r) for i, r in enumerate(records) if r is not None]
        n_thr = len(p.iouThrs)
        scores = np.concatenate([r["dtScores"][:MAX_DETS] for _, r in present] or [np.zeros(0)])
        image = np.concatenate([np.full(len(r["dtScores"][:MAX_DETS]), i) for i, r in present]
                               or [np.zeros(0, int)]).astype(int)
        matched = np.concatenate([r["dtMatches"][:, :MAX_DETS] for _, r in present]
                                 or [np.zeros((n_thr, 0))], axis=1) != 0
        ignored = np.concatenate([r["dtIgnore"][:, :MAX_DETS] for _, r in present]
                                 or [np.zeros((n_thr, 0))], axis=1) != 0
        order = np.argsort(-scores, kind="mergesort")
        out.append(ClassMatches(image[order], (matched & ~ignored)[:, order],
                                (~matched & ~ignored)[:, order], n_gt))
    return out


def average_precision(
    matches: list[ClassMatches], weights: np.ndarray, rec_thrs: np.ndarray
) -> np.ndarray:
    """AP per IoU threshold, mean over classes, with each image counted `weights[i]` times
    (all ones: the original sample; bootstrap counts: a resample). Returns (T,).

    A resample's repeated images enter as weights on the cumulative counts rather than as
    copies, so detections of equal score in two copies of one image are not interleaved;
    nothing else differs from pycocotools' accumulation.
    """
    per_class = []
    for m in matches:
        n_gt = float(weights @ m.n_gt)
        if n_gt == 0:
            continue  # pycocotools leaves a class with no ground truth out of the mean
        ap = np.zeros(m.true_positive.shape[0])
        if m.image.size:
            w = weights[m.image]
            tp = np.cumsum(m.true_positive * w, axis=1)
            fp = np.cumsum(m.false_positive * w, axis=1)
            recall = tp / n_gt
            precision = tp / (tp + fp + np.spacing(1))
            envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
            for t in range(len(ap)):
                idx = np.searchsorted(recall[t], rec_thrs, side="left")
                valid = idx < envelope.shape[1]
                ap[t] = np.where(valid, envelope[t, np.minimum(idx, envelope.shape[1] - 1)],
                                 0.0).mean()
        per_class.append(ap)
    if not per_class:
        return np.zeros(len(matches[0].true_positive) if matches else 1)
    return np.mean(per_class, axis=0)


def coco_map_ci(
    gt: COCO, detections: list[dict], image_ids: list[int], n_boot: int, seed: int,
    level: float = 0.95,
) -> dict:
    """`coco_map` plus percentile bootstrap intervals (`map50_ci95`, `map_ci95`), resampling
    the test images with replacement."""
    evaluator = evaluate(gt, detections, image_ids)
    if evaluator is None:
        return {"map50": 0.0, "map50_ci95": [0.0, 0.0], "map": 0.0, "map_ci95": [0.0, 0.0]}
    p = evaluator.params
    matches = class_matches(evaluator)
    iou50 = int(np.argmin(np.abs(p.iouThrs - 0.5)))
    rng = np.random.default_rng(seed)
    n = len(p.imgIds)
    boot = np.array([
        average_precision(matches, np.bincount(rng.integers(0, n, size=n), minlength=n),
                          p.recThrs)
        for _ in range(n_boot)
    ])
    alpha = (1.0 - level) / 2.0
    stats = np.maximum(evaluator.stats, 0.0)

    def interval(values: np.ndarray) -> list[float]:
        lo, hi = np.quantile(values, [alpha, 1.0 - alpha])
        return [float(lo), float(hi)]

    return {
        "map50": float(stats[1]),
        "map50_ci95": interval(boot[:, iou50]),
        "map": float(stats[0]),
        "map_ci95": interval(boot.mean(axis=1)),
    }

"""The bbox probe: a per-token linear map to class coverage, decoded into boxes.

Each token predicts the fraction of its image region covered by each object class (fit in
closed form). The predictions are upsampled to pixels, thresholded, split into connected
components per class, and each component's extent is a box. A per-token box-offset head
would not work: a token cannot know where an object's far edges are, and a pooled global
regression throws token positions away before it starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from vlmprobe.data.dataset import Split
from vlmprobe.extract.geometry import TokenGeometry, region_coverage
from vlmprobe.extract.tokens import Tokens, as_tokens, chunks
from vlmprobe.metrics.boxes import bootstrap_ci, matched_iou, ratio_of_sums
from vlmprobe.metrics.coco_map import coco_map, load_coco
from vlmprobe.probes.detection import (
    Detections,
    NonFiniteDetections,
    class_ids,
    coco_detections,
    invalid_result,
    require_finite_predictions,
)
from vlmprobe.probes.ridge import LinearMap, fit_ridge_stream


@dataclass(frozen=True)
class ProbeSettings:
    alphas: list[float]
    thresholds: list[float]
    min_component_px: int
    bootstrap: int
    seed: int


def coverage_targets(split: Split, geometry: TokenGeometry) -> np.ndarray:
    """(N, T, C): the fraction of every token's region covered by each class, from the masks."""
    ids = class_ids(split)
    boxes = geometry.token_boxes()
    h, w = split.images.shape[1:3]
    out = np.zeros((len(split.image_ids), len(boxes), len(ids)), dtype=np.float32)
    for i, (masks, labels) in enumerate(zip(split.masks, split.labels, strict=True)):
        class_masks = np.zeros((len(ids), h, w), dtype=bool)
        for mask, label in zip(masks, labels, strict=True):
            class_masks[ids.index(int(label))] |= mask
        out[i] = region_coverage(class_masks, boxes)
    return out


def decode(
    coverage: np.ndarray,
    geometry: TokenGeometry,
    ids: list[int],
    threshold: float,
    min_component_px: int,
) -> Detections:
    """Boxes from one image's predicted per-token coverage (T, C)."""
    pixels = geometry.render(coverage)
    best = pixels.argmax(axis=-1)
    foreground = pixels.max(axis=-1) > threshold
    boxes, labels, scores = [], [], []
    for c, category in enumerate(ids):
        components, _ = ndimage.label(foreground & (best == c))
        for k, region in enumerate(ndimage.find_objects(components), start=1):
            if region is None:
                continue
            member = components[region] == k
            if member.sum() < min_component_px:
                continue
            rows, cols = region
            boxes.append([cols.start, rows.start, cols.stop, rows.stop])
            labels.append(category)
            scores.append(float(pixels[region][..., c][member].mean()))
    return Detections(
        np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64),
        np.asarray(scores, dtype=np.float64),
    )


def score_split(
    predicted: np.ndarray,
    split: Split,
    geometry: TokenGeometry,
    threshold: float,
    min_component_px: int,
) -> tuple[np.ndarray, np.ndarray, list[Detections]]:
    """Per-image (paired IoU sum, slot count) and the decoded detections."""
    ids = class_ids(split)
    sums, denoms, detections = [], [], []
    for coverage, gt in zip(predicted, split.boxes, strict=True):
        found = decode(coverage, geometry, ids, threshold, min_component_px)
        s, d = matched_iou(gt, found.boxes)
        sums.append(s)
        denoms.append(d)
        detections.append(found)
    return np.asarray(sums), np.asarray(denoms), detections


RIDGE_ROWS = 65536  # tokens per chunk of the normal equations (a chunk is whole images)


def run_bbox_probe(
    features: dict[str, Tokens | np.ndarray],
    targets: dict[str, np.ndarray],
    splits: dict[str, Split],
    geometry: TokenGeometry,
    settings: ProbeSettings,
) -> dict:
    """Fit on train, choose the penalty and threshold on val, report on test.

    features[split]: (N, T, D) tokens, read a chunk of images at a time; targets[split]:
    (N, T, C) coverage from the masks.
    Non-finite predicted coverage is an error of this probe: such a penalty is never chosen,
    and if every penalty or the test prediction is non-finite the metrics are only
    `bbox_invalid` (the reason). Decoding would hide it (NaN > threshold is False).
    """
    features = {name: as_tokens(f) for name, f in features.items()}
    train, train_y = features["train"], targets["train"]
    per_chunk = max(1, RIDGE_ROWS // train.shape[1])
    fits = fit_ridge_stream(
        lambda: ((x.reshape(-1, x.shape[-1]), train_y[index].reshape(-1, train_y.shape[-1]))
                 for index, x in chunks(train, per_chunk)),
        settings.alphas)

    best: tuple[float, float, float] | None = None  # (val score, alpha, threshold)
    failed = ""  # why the last penalty that could not be scored was not
    for alpha, linear in fits.items():
        predicted = _predict(linear, features["val"])
        try:
            require_finite_predictions(f"bbox validation coverage (alpha {alpha})",
                                       {"coverage": list(predicted)})
        except NonFiniteDetections as e:
            failed = str(e)
            continue
        for threshold in settings.thresholds:
            sums, denoms, _ = score_split(
                predicted, splits["val"], geometry, threshold, settings.min_component_px
            )
            score = ratio_of_sums(sums, denoms)
            if best is None or score > best[0]:
                best = (score, alpha, threshold)
    if best is None:
        return invalid_result("bbox", f"no ridge penalty gave finite coverage; the last: "
                                      f"{failed}")
    val_score, alpha, threshold = best

    test = splits["test"]
    predicted = _predict(fits[alpha], features["test"])
    try:
        require_finite_predictions("bbox test coverage", {"coverage": list(predicted)})
    except NonFiniteDetections as e:
        return invalid_result("bbox", str(e))
    sums, denoms, detections = score_split(
        predicted, test, geometry, threshold, settings.min_component_px
    )
    maps = coco_map(load_coco(test.coco_path), coco_detections(test, detections), test.image_ids)
    return {
        "bbox_iou": ratio_of_sums(sums, denoms),
        "bbox_iou_ci95": list(bootstrap_ci(sums, denoms, settings.bootstrap, settings.seed)),
        "bbox_map50": maps["map50"],
        "bbox_map": maps["map"],
        "val_bbox_iou": val_score,
        "selected": {"alpha": alpha, "threshold": threshold},
    }


def _predict(linear: LinearMap, tokens: Tokens) -> np.ndarray:
    """(N, T, C) predicted coverage, a chunk of images at a time."""
    _, t, d = tokens.shape
    return np.concatenate([linear(x.reshape(-1, d)).reshape(len(x), t, -1)
                           for _, x in chunks(tokens, max(1, RIDGE_ROWS // t))])

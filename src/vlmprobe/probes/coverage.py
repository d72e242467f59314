"""The bbox probe: a per-token linear map to class coverage, decoded into boxes.

Each token predicts the fraction of its image region covered by each object class (fit in
closed form). The predictions are upsampled to pixels, thresholded, split into connected
components per class, and each component's extent is a box. A per-token box-offset head
would not work: a token cannot know where an object's far edges are, and a pooled global
regression throws token positions away before it starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
from vlmprobe.probes.registry import ProbeResult, TokenSet
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


@dataclass(frozen=True)
class RenderedCoverage:
    """One image's predicted per-token coverage upsampled to pixels, with what every
    threshold's decoding reads: each pixel's most covered class and that coverage."""

    pixels: np.ndarray  # (H, W, C)
    best: np.ndarray  # (H, W) class index
    peak: np.ndarray  # (H, W)

    @classmethod
    def of(cls, coverage: np.ndarray, geometry: TokenGeometry) -> RenderedCoverage:
        pixels = geometry.render(coverage)
        return cls(pixels, pixels.argmax(axis=-1), pixels.max(axis=-1))


def decode(
    coverage: np.ndarray | RenderedCoverage,
    geometry: TokenGeometry,
    ids: list[int],
    threshold: float,
    min_component_px: int,
) -> Detections:
    """Boxes from one image's predicted per-token coverage (T, C), or its rendering."""
    rendered = (coverage if isinstance(coverage, RenderedCoverage)
                else RenderedCoverage.of(coverage, geometry))
    pixels, best = rendered.pixels, rendered.best
    foreground = rendered.peak > threshold
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
    thresholds: list[float],
    min_component_px: int,
) -> dict[float, tuple[np.ndarray, np.ndarray, list[Detections]]]:
    """Per threshold, per-image (paired IoU sum, slot count) and the decoded detections; each
    image is rendered once for all thresholds."""
    ids = class_ids(split)
    scored: dict[float, tuple[list, list, list]] = {t: ([], [], []) for t in thresholds}
    for coverage, gt in zip(predicted, split.boxes, strict=True):
        rendered = RenderedCoverage.of(coverage, geometry)
        for threshold, (sums, denoms, detections) in scored.items():
            found = decode(rendered, geometry, ids, threshold, min_component_px)
            s, d = matched_iou(gt, found.boxes)
            sums.append(s)
            denoms.append(d)
            detections.append(found)
    return {t: (np.asarray(sums), np.asarray(denoms), detections)
            for t, (sums, denoms, detections) in scored.items()}


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
    `invalid` (the reason). Decoding would hide it (NaN > threshold is False).
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
        scored = score_split(predicted, splits["val"], geometry, settings.thresholds,
                             settings.min_component_px)
        for threshold, (sums, denoms, _) in scored.items():
            score = ratio_of_sums(sums, denoms)
            if best is None or score > best[0]:
                best = (score, alpha, threshold)
    if best is None:
        return invalid_result(f"no ridge penalty gave finite coverage; the last: {failed}")
    val_score, alpha, threshold = best

    test = splits["test"]
    predicted = _predict(fits[alpha], features["test"])
    try:
        require_finite_predictions("bbox test coverage", {"coverage": list(predicted)})
    except NonFiniteDetections as e:
        return invalid_result(str(e))
    sums, denoms, detections = score_split(predicted, test, geometry, [threshold],
                                           settings.min_component_px)[threshold]
    maps = coco_map(load_coco(test.coco_path), coco_detections(test, detections), test.image_ids)
    return {
        "iou": ratio_of_sums(sums, denoms),
        "iou_ci95": list(bootstrap_ci(sums, denoms, settings.bootstrap, settings.seed)),
        "map50": maps["map50"],
        "map": maps["map"],
        "val_iou": val_score,
        "selected": {"alpha": alpha, "threshold": threshold},
    }


def _predict(linear: LinearMap, tokens: Tokens) -> np.ndarray:
    """(N, T, C) predicted coverage, a chunk of images at a time."""
    _, t, d = tokens.shape
    return np.concatenate([linear(x.reshape(-1, d)).reshape(len(x), t, -1)
                           for _, x in chunks(tokens, max(1, RIDGE_ROWS // t))])


def run(tokens: TokenSet, settings: ProbeSettings, curves_dir: Path) -> ProbeResult:
    """The bbox probe as the registry runs it (`vlmprobe.probes.registry`)."""
    return ProbeResult(run_bbox_probe(tokens.features, tokens.targets, tokens.splits,
                                      tokens.geometry, settings))

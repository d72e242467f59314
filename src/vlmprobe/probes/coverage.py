"""The bbox probe (the plan's linear probe): a per-token linear readout of class coverage and of
the box of the instance under the token, decoded into boxes in one of two ways.

Each token predicts, by closed-form ridge maps, the fraction of its image region covered by each
object class and the distances from its centre to the four edges of the box of the instance
that covers most of its region (in token cells). Two decodings of that one readout; the probe
uses the one that scores better on val (with the penalty and the threshold):
- `token_boxes`: tokens whose largest predicted class coverage passes the threshold each
  propose their box for that class; per-class NMS keeps one box per instance. Touching
  instances of one class stay apart (their tokens name different boxes), and a box is as
  precise as the readout, not as coarse as the token grid.
- `components`: the coverage map upsampled to pixels, thresholded and split into connected
  components per class, each component's extent a box. It needs no box edges from the model,
  but merges touching instances of one class.

The oracle control (`vlmprobe.probes.controls`) encodes exactly these targets: what a perfect
model would give this readout.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torchvision.ops import batched_nms

from vlmprobe.data.dataset import Split
from vlmprobe.extract.geometry import TokenGeometry, region_coverage
from vlmprobe.extract.tokens import Tokens, as_tokens, chunks
from vlmprobe.metrics.boxes import bootstrap_ci, matched_iou, ratio_of_sums
from vlmprobe.metrics.coco_map import coco_map, load_coco
from vlmprobe.probes.detection import (
    MAX_DETECTIONS,
    NMS_IOU,
    Detections,
    NonFiniteDetections,
    TokenFrame,
    class_ids,
    coco_detections,
    invalid_result,
    require_finite_predictions,
)
from vlmprobe.probes.registry import ProbeResult, TokenSet
from vlmprobe.probes.ridge import HOST, LinearMap, fit_ridge_streams

EDGES = 4  # the targets' last columns: left, top, right, bottom distances in token cells


def pixel_frame(geometry: TokenGeometry) -> TokenFrame:
    return TokenFrame.of(geometry, normalised=False, dtype=torch.float64)


@dataclass(frozen=True)
class ProbeSettings:
    alphas: list[float]
    thresholds: list[float]
    min_component_px: int  # `components` decoding: smaller components are noise, not objects
    bootstrap: int
    seed: int
    device: torch.device = HOST  # where the ridge's normal equations are summed


def instance_targets(split: Split, geometry: TokenGeometry) -> np.ndarray:
    """(N, T, C + 4) per token: the fraction of its region covered by each class (C), then the
    edge distances (`TokenFrame.encode`) of the box of the instance covering most of its region
    (zeros where no instance covers any of it)."""
    ids = class_ids(split)
    token_boxes = geometry.token_boxes()
    frame = pixel_frame(geometry)
    h, w = split.images.shape[1:3]
    out = np.zeros((len(split.image_ids), len(token_boxes), len(ids) + EDGES), np.float32)
    for i, (masks, labels, boxes) in enumerate(
            zip(split.masks, split.labels, split.boxes, strict=True)):
        if len(labels) == 0:
            continue
        class_masks = np.zeros((len(ids), h, w), dtype=bool)
        for mask, label in zip(masks, labels, strict=True):
            class_masks[ids.index(int(label))] |= mask
        out[i, :, : len(ids)] = region_coverage(class_masks, token_boxes)
        instance = region_coverage(np.asarray(masks), token_boxes)  # (T, K)
        covered = instance.max(axis=1) > 0
        owner = torch.as_tensor(np.asarray(boxes, dtype=np.float64)[instance.argmax(axis=1)])
        out[i, covered, len(ids):] = frame.encode(owner).numpy()[covered]
    return out


DECODINGS = ("token_boxes", "components")


def decode_token_boxes(predicted: np.ndarray, frame: TokenFrame, ids: list[int],
                       threshold: float, image_size: tuple[int, int]) -> Detections:
    """One image's detections from its predicted per-token targets (T, C + 4): every token
    whose largest class coverage passes `threshold` proposes its box, scored by that coverage;
    per-class NMS keeps the best of overlapping proposals."""
    coverage = predicted[:, : len(ids)]
    best, score = coverage.argmax(axis=1), coverage.max(axis=1)
    h, w = image_size
    edges = torch.as_tensor(predicted[:, len(ids):], dtype=torch.float64)
    boxes = np.clip(frame.decode(edges).numpy(), 0, [w, h, w, h])
    proposed = (score > threshold) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, best, score = boxes[proposed], best[proposed], score[proposed]
    keep = batched_nms(torch.from_numpy(boxes), torch.from_numpy(score.astype(np.float64)),
                       torch.from_numpy(best), NMS_IOU)[:MAX_DETECTIONS].numpy()
    return Detections(boxes[keep].astype(np.float64), np.asarray(ids, np.int64)[best[keep]],
                      score[keep].astype(np.float64))


@dataclass(frozen=True)
class RenderedCoverage:
    """One image's predicted class coverage upsampled to pixels, with what every threshold's
    `components` decoding reads: each pixel's most covered class and that coverage."""

    pixels: np.ndarray  # (H, W, C)
    best: np.ndarray  # (H, W) class index
    peak: np.ndarray  # (H, W)

    @classmethod
    def of(cls, coverage: np.ndarray, geometry: TokenGeometry) -> RenderedCoverage:
        pixels = geometry.render(coverage)
        return cls(pixels, pixels.argmax(axis=-1), pixels.max(axis=-1))


def decode_components(rendered: RenderedCoverage, ids: list[int], threshold: float,
                      min_component_px: int) -> Detections:
    """One image's detections: the extent of every connected component of pixels whose most
    covered class passes `threshold`, scored by its mean coverage."""
    foreground = rendered.peak > threshold
    boxes, labels, scores = [], [], []
    for c, category in enumerate(ids):
        components, _ = ndimage.label(foreground & (rendered.best == c))
        for k, region in enumerate(ndimage.find_objects(components), start=1):
            if region is None:
                continue
            member = components[region] == k
            if member.sum() < min_component_px:
                continue
            rows, cols = region
            boxes.append([cols.start, rows.start, cols.stop, rows.stop])
            labels.append(category)
            scores.append(float(rendered.pixels[region][..., c][member].mean()))
    return Detections(np.asarray(boxes, dtype=np.float64).reshape(-1, 4),
                      np.asarray(labels, dtype=np.int64), np.asarray(scores, dtype=np.float64))


Scored = dict[tuple[str, float], tuple[np.ndarray, np.ndarray, list[Detections]]]


def score_split(predicted: np.ndarray, split: Split, geometry: TokenGeometry,
                choices: list[tuple[str, float]], min_component_px: int) -> Scored:
    """Per (decoding, threshold), per-image (paired IoU sum, slot count) and the decoded
    detections; each image's coverage is rendered once for every `components` threshold."""
    ids, frame = class_ids(split), pixel_frame(geometry)
    scored: dict[tuple[str, float], tuple[list, list, list]] = {c: ([], [], []) for c in choices}
    rendering = any(decoding == "components" for decoding, _ in choices)
    for targets, gt in zip(predicted, split.boxes, strict=True):
        rendered = RenderedCoverage.of(targets[:, : len(ids)], geometry) if rendering else None
        for (decoding, threshold), (sums, denoms, detections) in scored.items():
            if decoding == "components":
                found = decode_components(rendered, ids, threshold, min_component_px)
            else:
                found = decode_token_boxes(targets, frame, ids, threshold, geometry.image_size)
            s, d = matched_iou(gt, found.boxes)
            sums.append(s)
            denoms.append(d)
            detections.append(found)
    return {c: (np.asarray(sums), np.asarray(denoms), detections)
            for c, (sums, denoms, detections) in scored.items()}


RIDGE_ROWS = 65536  # tokens per chunk of the normal equations (a chunk is whole images)


@dataclass(frozen=True)
class Readout:
    """The two ridge maps of one penalty: class coverage (fit on every token) and box edges
    (fit on the tokens an instance covers: elsewhere there is no box to read)."""

    coverage: LinearMap
    edges: LinearMap

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.concatenate([self.coverage(x), self.edges(x)], axis=-1)


def fit_readouts(train: Tokens, targets: np.ndarray, alphas: list[float],
                 device: torch.device = HOST) -> dict[float, Readout]:
    """Both ridge maps for every penalty, from one stream of the training tokens."""
    n_classes = targets.shape[-1] - EDGES
    per_chunk = max(1, RIDGE_ROWS // train.shape[1])

    def problems():
        for index, x in chunks(train, per_chunk):
            x, y = x.reshape(-1, x.shape[-1]), targets[index].reshape(-1, targets.shape[-1])
            covered = y[:, :n_classes].sum(axis=1) > 0
            yield (x, y[:, :n_classes]), (x[covered], y[covered, n_classes:])

    coverage, edges = fit_ridge_streams(problems, alphas, device)
    return {alpha: Readout(coverage[alpha], edges[alpha]) for alpha in alphas}


def run_bbox_probe(
    features: dict[str, Tokens | np.ndarray],
    targets: dict[str, np.ndarray],
    splits: dict[str, Split],
    geometry: TokenGeometry,
    settings: ProbeSettings,
) -> dict:
    """Fit on train, choose the penalty, decoding and threshold on val, report on test.

    features[split]: (N, T, D) tokens, read a chunk of images at a time; targets[split]:
    (N, T, C + 4) from `instance_targets`.
    Non-finite predictions are an error of this probe: such a penalty is never chosen, and if
    every penalty or the test prediction is non-finite the metrics are only `invalid` (the
    reason). Decoding would hide it (NaN > threshold is False).
    """
    features = {name: as_tokens(f) for name, f in features.items()}
    if not (targets["train"][..., :-EDGES] > 0).any():
        return invalid_result("no object covers any training token: there is nothing to read")
    fits = fit_readouts(features["train"], targets["train"], settings.alphas, settings.device)

    choices = [(decoding, t) for decoding in DECODINGS for t in settings.thresholds]
    best: tuple[float, float, tuple[str, float]] | None = None  # (val score, alpha, choice)
    failed = ""  # why the last penalty that could not be scored was not
    for alpha, readout in fits.items():
        predicted = _predict(readout, features["val"])
        try:
            require_finite_predictions(f"bbox validation readout (alpha {alpha})",
                                       {"readout": list(predicted)})
        except NonFiniteDetections as e:
            failed = str(e)
            continue
        scored = score_split(predicted, splits["val"], geometry, choices,
                             settings.min_component_px)
        for choice, (sums, denoms, _) in scored.items():
            score = ratio_of_sums(sums, denoms)
            if best is None or score > best[0]:
                best = (score, alpha, choice)
    if best is None:
        return invalid_result(f"no ridge penalty gave a finite readout; the last: {failed}")
    val_score, alpha, choice = best

    test = splits["test"]
    predicted = _predict(fits[alpha], features["test"])
    try:
        require_finite_predictions("bbox test readout", {"readout": list(predicted)})
    except NonFiniteDetections as e:
        return invalid_result(str(e))
    sums, denoms, detections = score_split(predicted, test, geometry, [choice],
                                           settings.min_component_px)[choice]
    maps = coco_map(load_coco(test.coco_path), coco_detections(test, detections), test.image_ids)
    return {
        "iou": ratio_of_sums(sums, denoms),
        "iou_ci95": list(bootstrap_ci(sums, denoms, settings.bootstrap, settings.seed)),
        "map50": maps["map50"],
        "map": maps["map"],
        "val_iou": val_score,
        "selected": {"alpha": alpha, "decoding": choice[0], "threshold": choice[1]},
    }


def _predict(readout: Readout, tokens: Tokens) -> np.ndarray:
    """(N, T, C + 4) predicted targets, a chunk of images at a time."""
    _, t, d = tokens.shape
    return np.concatenate([readout(x.reshape(-1, d)).reshape(len(x), t, -1)
                           for _, x in chunks(tokens, max(1, RIDGE_ROWS // t))])


def run(tokens: TokenSet, settings: ProbeSettings, curves_dir: Path) -> ProbeResult:
    """The bbox probe as the registry runs it (`vlmprobe.probes.registry`)."""
    return ProbeResult(run_bbox_probe(tokens.features, tokens.targets, tokens.splits,
                                      tokens.geometry, settings))

"""The dense detection probe: per-token class scores and box regression from a small
convolutional head on the token grid, decoded with NMS (FCOS-style).

Capacity: a 1x1 convolution projects the (standardised) tokens to `width` channels, then `depth`
3x3 convolutions (GroupNorm, ReLU) give each token a receptive field of 2 * depth + 1 tokens a
side; three 3x3 heads predict per-class scores, a centre-ness score and the distances from the
token's centre to the four box edges (in token cells). A token is positive for an object when
its centre lies inside the object's box. Losses: sigmoid focal loss for classes, GIoU and L1
for boxes and binary cross-entropy for centre-ness on positives. A detection's score is
sqrt(class probability x centre-ness); per-class NMS at IoU 0.5 keeps at most 100 per image.
Grids of one extraction point share the head (anyres tiles are run grid by grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import batched_nms, generalized_box_iou_loss, sigmoid_focal_loss

from vlmprobe.data.dataset import Split
from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.extract.tokens import Tokens
from vlmprobe.probes.detection import (
    MAX_DETECTIONS,
    NMS_IOU,
    Detections,
    NonFiniteDetections,
    Targets,
    TokenFrame,
    class_ids,
    curve_values,
    detection_scores,
    invalid_result,
    map50,
    mirror_targets,
    no_detections,
    require_finite_predictions,
    split_targets,
)
from vlmprobe.probes.registry import ProbeResult, TokenSet
from vlmprobe.probes.training import (
    DeviceBatches,
    Evaluation,
    FitSettings,
    Standardizer,
    deterministic_torch,
    device_tokens,
    fit,
    from_grids,
    mirror_permutation,
    mirrored,
    to_grids,
)

SCORE_FLOOR = 0.05  # detections scoring below this are dropped before NMS


@dataclass(frozen=True)
class DenseSettings:
    fit: FitSettings
    width: int
    depth: int
    flip: bool
    bootstrap: int


class DenseHead(nn.Module):
    def __init__(self, in_dim: int, n_classes: int, width: int, depth: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_dim, width, 1)]
        for _ in range(depth):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.ReLU()]
        self.tower = nn.Sequential(*layers)
        self.classify = nn.Conv2d(width, n_classes, 3, padding=1)
        self.centreness = nn.Conv2d(width, 1, 3, padding=1)
        self.box = nn.Conv2d(width, 4, 3, padding=1)
        nn.init.constant_(self.classify.bias, -math.log(99.0))  # start at p = 0.01

    def forward(self, tokens: torch.Tensor, geometry: TokenGeometry):
        """tokens (B, T, D) -> class logits (B, T, C), centre-ness logit (B, T), ltrb (B, T, 4)
        in token cells."""
        outs = []
        for grid in to_grids(tokens, geometry):
            f = self.tower(grid)
            outs.append(torch.cat([self.classify(f), self.centreness(f),
                                   F.softplus(self.box(f))], dim=1))
        out = from_grids(outs)
        c = out.shape[-1] - 5
        return out[..., :c], out[..., c], out[..., c + 1 :]


def token_targets(target: Targets, frame: TokenFrame, n_classes: int):
    """Per token: one-hot classes (T, C), positive mask (T,), box (T, 4) xyxy, centre-ness (T,).

    A token is positive for the smallest box containing its centre.
    """
    t = len(frame.centre)
    classes = torch.zeros(t, n_classes)
    boxes = torch.zeros(t, 4)
    centreness = torch.zeros(t)
    if len(target.classes) == 0:
        return classes, torch.zeros(t, dtype=torch.bool), boxes, centreness
    b = target.boxes
    x, y = frame.centre[:, 0:1], frame.centre[:, 1:2]
    dist = torch.stack([x - b[:, 0], y - b[:, 1], b[:, 2] - x, b[:, 3] - y], dim=-1)  # (T, K, 4)
    inside = dist.min(dim=-1).values > 0
    area = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).expand(t, -1)
    area = torch.where(inside, area, torch.full_like(area, float("inf")))
    best = area.argmin(dim=1)
    positive = inside.any(dim=1)
    rows = torch.arange(t)[positive]
    classes[rows, target.classes[best[positive]]] = 1.0
    boxes[positive] = b[best[positive]]
    d = dist[rows, best[positive]]
    lr_, tb = d[:, [0, 2]], d[:, [1, 3]]
    centreness[positive] = torch.sqrt(
        (lr_.min(1).values / lr_.max(1).values) * (tb.min(1).values / tb.max(1).values)
    )
    return classes, positive, boxes, centreness


def dense_loss(outputs, truth) -> torch.Tensor:
    logits, centre_logit, ltrb, frame = outputs
    classes, positive, boxes, centreness = truth
    n_pos = max(int(positive.sum()), 1)
    loss = sigmoid_focal_loss(logits, classes, reduction="sum") / n_pos
    if positive.any():
        pred = frame.decode(ltrb)[positive]
        loss = loss + 2.0 * generalized_box_iou_loss(pred, boxes[positive], reduction="mean")
        loss = loss + 5.0 * F.l1_loss(pred, boxes[positive])
        loss = loss + F.binary_cross_entropy_with_logits(
            centre_logit[positive], centreness[positive]
        )
    return loss


@torch.no_grad()
def predict(model: DenseHead, tokens: DeviceBatches, geometry: TokenGeometry, frame: TokenFrame,
            ids: list[int], batch_size: int = 64) -> list[Detections]:
    model.eval()
    h, w = geometry.image_size
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    out = []
    for batch in tokens.in_order(batch_size):
        logits, centre_logit, ltrb = (o.float().cpu() for o in model(batch, geometry))
        scores = torch.sqrt(logits.sigmoid() * centre_logit.sigmoid()[..., None])
        boxes = frame.decode(ltrb) * scale
        # Checked before the score floor: NaN > floor is False, so NaN scores would vanish
        # silently and a diverged head would read as one that found nothing.
        require_finite_predictions("dense head outputs", {"scores": list(scores),
                                                          "boxes": list(boxes)})
        for score, box in zip(scores, boxes, strict=True):
            token, cls = torch.nonzero(score > SCORE_FLOOR, as_tuple=True)
            kept_scores = score[token, cls]
            kept_boxes = box[token]
            keep = batched_nms(kept_boxes, kept_scores, cls, NMS_IOU)[:MAX_DETECTIONS]
            out.append(Detections(
                kept_boxes[keep].double().numpy(),
                np.asarray(ids)[cls[keep].numpy()].astype(np.int64),
                kept_scores[keep].double().numpy(),
            ))
    model.train()
    return out


@dataclass
class DenseDetector:
    """A trained dense head and what it needs to detect on new tokens of the same geometry
    (standardised with the training split's statistics)."""

    model: DenseHead
    standardize: Standardizer
    geometry: TokenGeometry
    ids: list[int]
    settings: DenseSettings
    val_map50: float
    selected_step: int

    def detect(self, features: Tokens | np.ndarray) -> list[Detections]:
        """Detections (pixel boxes) on (N, T, D) tokens."""
        fit_settings = self.settings.fit
        with deterministic_torch(fit_settings.seed, fit_settings.threads, fit_settings.device):
            return predict(self.model, device_tokens(features, self.standardize,
                                                    fit_settings.device),
                           self.geometry, TokenFrame.of(self.geometry), self.ids)


def train_dense_head(
    features: dict[str, Tokens | np.ndarray],
    splits: dict[str, Split],
    geometry: TokenGeometry,
    settings: DenseSettings,
    curves_dir: Path,
) -> DenseDetector:
    """Train on the train split, keep the checkpoint with the best val mAP@0.5 among those
    whose detections are finite; raise NonFiniteDetections if there is none."""
    ids = class_ids(splits["train"])
    device = settings.fit.device
    standardize = Standardizer(features["train"])
    x = {name: device_tokens(features[name], standardize, device) for name in ("train", "val")}
    frame = TokenFrame.of(geometry)
    targets = split_targets(splits["train"])
    truth = [token_targets(t, frame, len(ids)) for t in targets]
    mirror = mirror_permutation(geometry) if settings.flip else None
    truth_flipped = (truth if mirror is None else
                     [token_targets(mirror_targets(t), frame, len(ids)) for t in targets])
    frame_on_device = frame.to(device)
    mirror_index = None if mirror is None else torch.as_tensor(mirror, device=device)

    def step_loss(model, index, generator, step):
        tokens, flips = mirrored(x["train"].batch(index), generator, mirror_index)
        batch_truth = [truth_flipped[i] if f else truth[i]
                       for i, f in zip(index.tolist(), flips, strict=True)]
        stacked = [torch.stack(parts).to(device) for parts in zip(*batch_truth, strict=True)]
        logits, centre_logit, ltrb = model(tokens, geometry)
        return dense_loss((logits, centre_logit, ltrb, frame_on_device), stacked)

    def evaluate(model, step, train_loss):
        try:
            val, why = map50(splits["val"], predict(model, x["val"], geometry, frame, ids)), ""
        except NonFiniteDetections as e:
            val, why = None, str(e)
        return Evaluation(val, curve_values(train_loss=train_loss, val_map50=val), why)

    fitted = fit(lambda: DenseHead(x["train"].shape[-1], len(ids), settings.width,
                                   settings.depth),
                 len(targets), step_loss, evaluate, settings.fit, curves_dir, "dense")
    if fitted.score is None:
        raise NonFiniteDetections(
            f"no checkpoint gave finite validation detections; the last, {fitted.unscored}")
    return DenseDetector(fitted.model, standardize, geometry, ids, settings, fitted.score,
                         fitted.step)


def run_dense_probe(
    features: dict[str, Tokens | np.ndarray],
    splits: dict[str, Split],
    geometry: TokenGeometry,
    settings: DenseSettings,
    curves_dir: Path,
) -> tuple[dict, list[Detections]]:
    """Train on train, pick the checkpoint by val mAP@0.5, report test `map50`, `map` (+ CIs).
    Returns the metrics and the test detections; a head whose detections are not finite gives
    only `invalid` (the reason) and no detections."""
    try:
        detector = train_dense_head(features, splits, geometry, settings, curves_dir)
        test_found = detector.detect(features["test"])
        metrics = detection_scores(splits["test"], test_found, settings.bootstrap,
                                   settings.fit.seed)
    except NonFiniteDetections as e:
        return invalid_result(str(e)), no_detections(features["test"].shape[0])
    metrics["val_map50"] = detector.val_map50
    metrics["selected_step"] = detector.selected_step
    return metrics, test_found


def run(tokens: TokenSet, settings: DenseSettings, curves_dir: Path) -> ProbeResult:
    """The dense probe as the registry runs it (`vlmprobe.probes.registry`)."""
    metrics, found = run_dense_probe(tokens.features, tokens.splits, tokens.geometry, settings,
                                     curves_dir)
    return ProbeResult(metrics, detections=found)

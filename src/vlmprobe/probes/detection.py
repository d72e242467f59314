"""What the detection probes share: detections, ground truth as tensors, mAP scoring.

A head that diverged gives NaN or inf boxes or scores; pycocotools would count NaN boxes as
hits (`iou < threshold` is False for NaN), so such detections are never scored: the probe's
result is marked invalid with the reason (`invalid_result`) instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlmprobe.data.dataset import Split
from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.metrics.boxes import xyxy_to_xywh
from vlmprobe.metrics.coco_map import coco_map, coco_map_ci, load_coco
from vlmprobe.metrics.finite import describe_nonfinite, nonfinite_counts

NMS_IOU = 0.5  # per-class NMS of the probes that decode one proposal per token
MAX_DETECTIONS = 100  # per image, as COCO scores


@dataclass(frozen=True)
class Detections:
    boxes: np.ndarray  # (K, 4) xyxy pixels
    labels: np.ndarray  # (K,) category ids
    scores: np.ndarray  # (K,)


@dataclass(frozen=True)
class Targets:
    """One image's ground truth for training: boxes as fractions of the image size."""

    boxes: torch.Tensor  # (K, 4) xyxy in [0, 1]
    classes: torch.Tensor  # (K,) class index into the split's categories

    def to(self, device: torch.device) -> Targets:
        return Targets(self.boxes.to(device), self.classes.to(device))


@dataclass(frozen=True)
class TokenFrame:
    """Each token's centre and cell size, in pixels or (`normalised`) as fractions of the image:
    the frame in which the probes that regress boxes per token code a box as the distances from
    the token's centre to its four edges (left, top, right, bottom), in token cells."""

    centre: torch.Tensor  # (T, 2) x, y
    cell: torch.Tensor  # (T, 2) width, height

    @classmethod
    def of(cls, geometry: TokenGeometry, normalised: bool = True,
           dtype: torch.dtype = torch.float32) -> TokenFrame:
        b = torch.from_numpy(geometry.token_boxes()).to(dtype)
        if normalised:
            h, w = geometry.image_size
            b = b / torch.tensor([w, h, w, h], dtype=dtype)
        return cls((b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2])

    def to(self, device: torch.device) -> TokenFrame:
        return TokenFrame(self.centre.to(device), self.cell.to(device))

    def encode(self, boxes: torch.Tensor) -> torch.Tensor:
        """(..., T, 4) xyxy boxes, one per token -> (..., T, 4) edge distances in cells."""
        return torch.cat([(self.centre - boxes[..., :2]) / self.cell,
                          (boxes[..., 2:] - self.centre) / self.cell], dim=-1)

    def decode(self, ltrb: torch.Tensor) -> torch.Tensor:
        """(..., T, 4) edge distances in cells -> xyxy boxes."""
        cell = self.cell.repeat(1, 2)
        sign = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=cell.dtype, device=cell.device)
        return self.centre.repeat(1, 2) + sign * ltrb * cell


class NonFiniteDetections(ValueError):
    """A detection probe predicted NaN or inf boxes, scores or coverage: that probe failed."""


def require_finite_predictions(what: str, arrays: dict[str, list[np.ndarray]]) -> None:
    """Raise NonFiniteDetections if any of `arrays` (a name -> one array per image) holds a
    NaN or inf, with the counts, the number of images affected and what it means."""
    problems, bad_images, n_images = [], set(), 0
    for name, per_image in arrays.items():
        n_images = max(n_images, len(per_image))
        totals = np.zeros(3, dtype=np.int64)
        for i, values in enumerate(per_image):
            counts = nonfinite_counts(values)
            if counts[0] or counts[1]:
                bad_images.add(i)
            totals += counts
        if totals[0] or totals[1]:
            problems.append(f"{describe_nonfinite(*totals.tolist())} in {name}")
    if problems:
        raise NonFiniteDetections(
            f"{what}: {'; '.join(problems)} ({len(bad_images)} of {n_images} images). The "
            "probe's head diverged (or its input was non-finite), so these are not scored: "
            "pycocotools would count NaN boxes as hits. Fix: a lower `lr` or fewer `steps` "
            "for this probe in params.yaml, and check its training curves."
        )


def require_finite_detections(detections: list[Detections], what: str) -> None:
    require_finite_predictions(what, {"boxes": [d.boxes for d in detections],
                                      "scores": [d.scores for d in detections]})


def invalid_result(reason: str) -> dict:
    """The record of a probe that failed: its reason under `invalid`, and no number under any
    of its metric keys (so nothing downstream can take one as a result)."""
    return {"invalid": reason}


def curve_values(**values: float | None) -> dict[str, float]:
    """The values that get a point on a training curve: a diverged loss (NaN) or a checkpoint
    that could not be scored (None) is left out, so no non-finite number is logged."""
    return {k: v for k, v in values.items() if v is not None and np.isfinite(v)}


def no_detections(n_images: int) -> list[Detections]:
    """Empty detections per image: what a failed probe hands the figures."""
    empty = Detections(np.zeros((0, 4)), np.zeros(0, dtype=np.int64), np.zeros(0))
    return [empty] * n_images


def class_ids(split: Split) -> list[int]:
    return [c["id"] for c in split.categories]


def split_targets(split: Split) -> list[Targets]:
    h, w = split.images.shape[1:3]
    scale = np.array([w, h, w, h], dtype=np.float64)
    index = {category: i for i, category in enumerate(class_ids(split))}
    return [
        Targets(
            torch.from_numpy((boxes / scale).astype(np.float32)).reshape(-1, 4),
            torch.tensor([index[int(c)] for c in labels], dtype=torch.long),
        )
        for boxes, labels in zip(split.boxes, split.labels, strict=True)
    ]


def mirror_targets(targets: Targets) -> Targets:
    b = targets.boxes
    mirrored = torch.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], dim=1)
    return Targets(mirrored, targets.classes)


def coco_detections(split: Split, detections: list[Detections]) -> list[dict]:
    return [
        {"image_id": image_id, "category_id": int(label), "bbox": box.tolist(), "score": score}
        for image_id, found in zip(split.image_ids, detections, strict=True)
        for box, label, score in zip(
            xyxy_to_xywh(found.boxes), found.labels, found.scores.tolist(), strict=True
        )
    ]


def detection_scores(split: Split, detections: list[Detections], n_boot: int, seed: int) -> dict:
    """`map50`, `map` and their `_ci95` bootstrap intervals (pycocotools).

    Raises NonFiniteDetections if a box or score is NaN or inf.
    """
    require_finite_detections(detections, "test detections")
    result = coco_map_ci(
        load_coco(split.coco_path), coco_detections(split, detections), split.image_ids,
        n_boot, seed,
    )
    return result


def map50(split: Split, detections: list[Detections]) -> float:
    """mAP@0.5 alone, no interval: for choosing checkpoints on the validation split.

    Raises NonFiniteDetections if a box or score is NaN or inf.
    """
    require_finite_detections(detections, "validation detections")
    return coco_map(load_coco(split.coco_path), coco_detections(split, detections),
                    split.image_ids)["map50"]

"""What the detection probes share: detections, ground truth as tensors, mAP scoring."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vlmprobe.data.dataset import Split
from vlmprobe.metrics.boxes import xyxy_to_xywh
from vlmprobe.metrics.coco_map import coco_map, coco_map_ci, load_coco


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


def detection_scores(
    split: Split, detections: list[Detections], prefix: str, n_boot: int, seed: int
) -> dict:
    """`<prefix>map50`, `<prefix>map` and their `_ci95` bootstrap intervals (pycocotools)."""
    result = coco_map_ci(
        load_coco(split.coco_path), coco_detections(split, detections), split.image_ids,
        n_boot, seed,
    )
    return {f"{prefix}{k}": v for k, v in result.items()}


def map50(split: Split, detections: list[Detections]) -> float:
    """mAP@0.5 alone, no interval: for choosing checkpoints on the validation split."""
    return coco_map(load_coco(split.coco_path), coco_detections(split, detections),
                    split.image_ids)["map50"]

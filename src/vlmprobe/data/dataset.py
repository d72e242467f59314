"""Loading the image dataset the data stage wrote (COCO format, any source) into arrays.

Crowd regions (iscrowd 1, COCO only) stay in the JSON, where pycocotools treats them as
regions to ignore, but are not instances: the splits' boxes, labels and masks leave them out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from vlmprobe.data.loader import read_images
from vlmprobe.errors import MissingInput
from vlmprobe.io import read_json

SPLITS = ("train", "val", "test")


class DatasetError(MissingInput):
    """A dataset file is missing: the data stage has not been run (or its output was removed)."""


@dataclass(frozen=True)
class Split:
    name: str
    root: Path
    coco_path: Path
    image_ids: list[int]  # in file order
    images: np.ndarray  # (N, H, W, 3) uint8
    boxes: list[np.ndarray]  # per image (K, 4) float xyxy in pixels
    labels: list[np.ndarray]  # per image (K,) int category ids
    masks: list[np.ndarray]  # per image (K, H, W) bool
    categories: list[dict]  # [{id, name}]


def _require_file(path: Path) -> None:
    if path.exists() and not path.is_file():  # e.g. a FIFO: "not found" would mislead
        raise DatasetError(f"{path} is not a regular file; run `dvc repro --force data` to "
                           "write the dataset again.")
    if not path.is_file():
        raise DatasetError(f"{path} not found; run `dvc repro data` to generate the dataset.")


def coco_path(root: Path, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return Path(root) / f"instances_{split}.json"


def _read_coco(root: Path, split: str) -> dict[str, Any]:
    path = coco_path(root, split)
    _require_file(path)
    return read_json(path)


def _load_images(root: Path, image_entries: list[dict], workers: int = 1) -> np.ndarray:
    paths = [Path(root) / entry["file_name"] for entry in image_entries]
    for path in paths:
        _require_file(path)
    return read_images(paths, workers)


def _xyxy(bbox: list[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y + h]


def load_split(root: Path, split: str) -> Split:
    """Images, boxes, labels and masks of one split, aligned with the JSON's image order."""
    root = Path(root)
    coco = _read_coco(root, split)
    annotations_of: dict[int, list[dict]] = {entry["id"]: [] for entry in coco["images"]}
    for annotation in coco["annotations"]:
        if not annotation.get("iscrowd", 0):
            annotations_of[annotation["image_id"]].append(annotation)
    images = _load_images(root, coco["images"])
    height, width = images.shape[1:3]
    boxes, labels, masks = [], [], []
    for entry in coco["images"]:
        annotations = annotations_of[entry["id"]]
        boxes.append(np.array([_xyxy(a["bbox"]) for a in annotations], float).reshape(-1, 4))
        labels.append(np.array([a["category_id"] for a in annotations], dtype=np.int64))
        masks.append(
            np.array(
                [mask_utils.decode(a["segmentation"]).astype(bool) for a in annotations],
                dtype=bool,
            ).reshape(-1, height, width)
        )
    return Split(
        name=split,
        root=root,
        coco_path=coco_path(root, split),
        image_ids=[entry["id"] for entry in coco["images"]],
        images=images,
        boxes=boxes,
        labels=labels,
        masks=masks,
        categories=[{"id": c["id"], "name": c["name"]} for c in coco["categories"]],
    )


def load_all_images(root: Path, workers: int = 1) -> tuple[list[int], np.ndarray]:
    """Every split's images, in ascending image id, decoded in `workers` processes."""
    entries = sorted(
        (entry for split in SPLITS for entry in _read_coco(root, split)["images"]),
        key=lambda entry: entry["id"],
    )
    return [entry["id"] for entry in entries], _load_images(root, entries, workers)

"""Loading the image dataset the data stage wrote (COCO format, any source).

A split's images and masks are decoded from their files when read (`SplitImages`,
`SplitMasks`), so a stage that reads a batch at a time holds a batch, not the split.

Crowd regions (iscrowd 1, COCO only) stay in the JSON, where pycocotools treats them as
regions to ignore, but are not instances: the splits' boxes, labels and masks leave them out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from vlmprobe.data.loader import read_images, read_rgb
from vlmprobe.errors import MissingInput
from vlmprobe.io import read_json

SPLITS = ("train", "val", "test")


class DatasetError(MissingInput):
    """A dataset file is missing: the data stage has not been run (or its output was removed)."""


IMAGE_CACHE_BYTES = 128 * 2**20  # decoded images kept, all splits together (the default's all)


FileIdentity = tuple[int, int, int, int]


def file_identity(path: Path) -> FileIdentity:
    """What tells one file's contents from another's: the same relative path in another
    working directory, or a file written again in place, is a different key."""
    stat = path.stat()
    return stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size


class DecodedImages:
    """The most recently read decoded images of every split, by file identity, up to
    IMAGE_CACHE_BYTES in all: small datasets are decoded once, large ones cost the budget,
    not their size."""

    def __init__(self):
        self.images: OrderedDict[FileIdentity, np.ndarray] = OrderedDict()
        self.nbytes = 0

    def read(self, path: Path) -> np.ndarray:
        key = file_identity(path)
        image = self.images.get(key)
        if image is not None:
            self.images.move_to_end(key)
            return image
        image = read_rgb(path)
        image.flags.writeable = False  # shared by every reader of the cache
        self.images[key] = image
        self.nbytes += image.nbytes
        while self.nbytes > IMAGE_CACHE_BYTES and len(self.images) > 1:
            self.nbytes -= self.images.popitem(last=False)[1].nbytes
        return image


DECODED = DecodedImages()


class SplitImages:
    """A split's images as a read-only (N, H, W, 3) uint8 array whose images are decoded from
    their files when indexed (an int, a slice, a list or array of indices), iterated or
    converted (`np.asarray`), and kept in the `DECODED` cache."""

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __init__(self, paths: list[Path]):
        self.paths = list(paths)
        first = DECODED.read(self.paths[0]) if self.paths else np.zeros((0, 0, 3), np.uint8)
        self.shape = (len(self.paths), *first.shape)

    def image(self, i: int) -> np.ndarray:
        image = DECODED.read(self.paths[i])
        if image.shape != self.shape[1:]:
            raise DatasetError(f"{self.paths[i]} is {image.shape[1]}x{image.shape[0]}, the "
                               f"split's first image {self.shape[2]}x{self.shape[1]}; run "
                               "`dvc repro --force data` to write the dataset again.")
        return image

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key):
        if isinstance(key, int | np.integer):
            return self.image(range(len(self))[key])
        index = np.arange(len(self))[key]
        if not len(index):
            return np.empty((0, *self.shape[1:]), dtype=np.uint8)
        return np.stack([self.image(int(i)) for i in index])

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self.image(i) for i in range(len(self)))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)


class SplitMasks(Sequence):
    """Per image, the (K, H, W) bool masks of its instances, decoded from the split's
    run-length encodings when read."""

    def __init__(self, encodings: list[list[dict]], height: int, width: int):
        self.encodings, self.height, self.width = encodings, height, width

    def __len__(self) -> int:
        return len(self.encodings)

    def __getitem__(self, key):
        if isinstance(key, slice):
            return SplitMasks(self.encodings[key], self.height, self.width)
        return np.array([mask_utils.decode(e).astype(bool) for e in self.encodings[key]],
                        dtype=bool).reshape(-1, self.height, self.width)


@dataclass(frozen=True)
class Split:
    name: str
    root: Path
    coco_path: Path
    image_ids: list[int]  # in file order
    images: SplitImages | np.ndarray  # (N, H, W, 3) uint8
    boxes: list[np.ndarray]  # per image (K, 4) float xyxy in pixels
    labels: list[np.ndarray]  # per image (K,) int category ids
    masks: SplitMasks | list[np.ndarray]  # per image (K, H, W) bool
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


def _image_paths(root: Path, image_entries: list[dict]) -> list[Path]:
    paths = [Path(root) / entry["file_name"] for entry in image_entries]
    for path in paths:
        _require_file(path)
    return paths


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
    images = SplitImages(_image_paths(root, coco["images"]))
    height, width = images.shape[1:3]
    boxes, labels, encodings = [], [], []
    for entry in coco["images"]:
        annotations = annotations_of[entry["id"]]
        boxes.append(np.array([_xyxy(a["bbox"]) for a in annotations], float).reshape(-1, 4))
        labels.append(np.array([a["category_id"] for a in annotations], dtype=np.int64))
        encodings.append([a["segmentation"] for a in annotations])
    return Split(
        name=split,
        root=root,
        coco_path=coco_path(root, split),
        image_ids=[entry["id"] for entry in coco["images"]],
        images=images,
        boxes=boxes,
        labels=labels,
        masks=SplitMasks(encodings, height, width),
        categories=[{"id": c["id"], "name": c["name"]} for c in coco["categories"]],
    )


def load_all_images(root: Path, workers: int = 1) -> tuple[list[int], np.ndarray]:
    """Every split's images, in ascending image id, decoded in `workers` processes."""
    entries = sorted(
        (entry for split in SPLITS for entry in _read_coco(root, split)["images"]),
        key=lambda entry: entry["id"],
    )
    return [entry["id"] for entry in entries], read_images(_image_paths(root, entries), workers)

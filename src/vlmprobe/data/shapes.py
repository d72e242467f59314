"""Synthetic shapes: images of non-overlapping circles, squares and triangles with COCO annotations.

Objects never overlap, so every instance mask is complete and its box is the tight box of the
mask: a probe's error is then the model's, not the label's. The drawing helpers here are shared
with `moving_shapes`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from tqdm import tqdm

from vlmprobe.io import atomic_dir, write_json

CATEGORIES = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
)
CATEGORY_IDS = tuple(c["id"] for c in CATEGORIES)

# Saturated object colours; the background is any colour, so objects draw from this palette.
PALETTE = np.array(
    [
        (230, 25, 25),  # red
        (25, 190, 25),  # green
        (30, 60, 230),  # blue
        (245, 220, 20),  # yellow
        (220, 20, 220),  # magenta
        (20, 210, 220),  # cyan
        (250, 130, 0),  # orange
        (130, 40, 200),  # purple
    ],
    dtype=np.uint8,
)
# Minimum RGB distance between an object and its background; at 120 every background colour
# still leaves at least 5 palette colours to choose from.
MIN_CONTRAST = 120.0
MIN_SHAPE_SIZE = 4  # below this the three classes are not distinguishable
MARGIN = 3  # px of background kept between any two object boxes
PLACEMENT_TRIES = 100  # random positions tried before an object is dropped

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 with x1, y1 exclusive


@dataclass(frozen=True)
class Shape:
    category_id: int
    size: int  # side of its square box, px
    colour: np.ndarray  # (3,) uint8

    def paint(self, image: np.ndarray, x: int, y: int) -> np.ndarray:
        """Paint the shape with its box's top-left corner at (x, y); return its (H, W) mask."""
        mask = frame_mask(self.category_id, self.size, x, y, image.shape[0])
        image[mask] = self.colour
        return mask


@dataclass(frozen=True)
class Instance:
    category_id: int
    mask: np.ndarray  # (H, W) bool


def shape_mask(category_id: int, size: int) -> np.ndarray:
    """A (size, size) bool mask of the shape; it touches all four sides, so its box is the square.

    Pixels are tested at their centres, which keeps the masks free of anti-aliased edges.
    """
    centres = np.arange(size) + 0.5
    y, x = np.meshgrid(centres, centres, indexing="ij")
    half = size / 2
    if category_id == 1:  # circle
        return (x - half) ** 2 + (y - half) ** 2 <= half**2
    if category_id == 2:  # square
        return np.ones((size, size), dtype=bool)
    if category_id == 3:  # triangle, apex up; row i is i + 1 px wide so the apex row is not empty
        return np.abs(x - half) <= (y + 0.5) / 2
    raise ValueError(f"unknown category id {category_id}; expected one of {CATEGORY_IDS}")


def frame_mask(category_id: int, size: int, x: int, y: int, image_size: int) -> np.ndarray:
    """The shape's mask placed with its top-left corner at (x, y) in an image_size frame."""
    mask = np.zeros((image_size, image_size), dtype=bool)
    mask[y : y + size, x : x + size] = shape_mask(category_id, size)
    return mask


def tight_box(mask: np.ndarray) -> list[int]:
    """COCO [x, y, w, h] of the smallest box holding every pixel of a non-empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def random_background(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=3).astype(np.uint8)


def contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> np.ndarray:
    """A palette colour that stands out clearly from `background`."""
    distance = np.linalg.norm(PALETTE.astype(float) - background.astype(float), axis=1)
    return PALETTE[rng.choice(np.flatnonzero(distance >= MIN_CONTRAST))]


def random_shape(
    rng: np.random.Generator, background: np.ndarray, min_size: int, max_size: int
) -> Shape:
    return Shape(
        category_id=int(rng.choice(CATEGORY_IDS)),
        size=int(rng.integers(min_size, max_size + 1)),
        colour=contrasting_colour(rng, background),
    )


def boxes_apart(a: Box, b: Box, margin: int) -> bool:
    """Whether at least `margin` px separate the two boxes along some axis."""
    return (
        a[2] + margin <= b[0]
        or b[2] + margin <= a[0]
        or a[3] + margin <= b[1]
        or b[3] + margin <= a[1]
    )


def place_square(
    rng: np.random.Generator, size: int, image_size: int, occupied: list[Box]
) -> Box | None:
    """A random size x size box in the image, MARGIN px clear of `occupied`; None if none fits."""
    for _ in range(PLACEMENT_TRIES):
        x, y = rng.integers(0, image_size - size + 1, size=2)
        box = (int(x), int(y), int(x) + size, int(y) + size)
        if all(boxes_apart(box, other, MARGIN) for other in occupied):
            return box
    return None


def save_png(image: np.ndarray, path: Path) -> None:
    # No pnginfo: the file depends on the pixels alone, so reruns are byte-identical.
    Image.fromarray(image).save(path, format="PNG")


def draw_scene(
    rng: np.random.Generator,
    image_size: int,
    n_objects: int,
    min_size: int,
    max_size: int,
) -> tuple[np.ndarray, list[Instance], int]:
    """One image with up to `n_objects` shapes; also returns how many could not be placed."""
    background = random_background(rng)
    image = np.broadcast_to(background, (image_size, image_size, 3)).copy()
    instances: list[Instance] = []
    occupied: list[Box] = []
    for _ in range(n_objects):
        shape = random_shape(rng, background, min_size, max_size)
        box = place_square(rng, shape.size, image_size, occupied)
        if box is None:
            continue
        occupied.append(box)
        instances.append(Instance(shape.category_id, shape.paint(image, box[0], box[1])))
    return image, instances, n_objects - len(instances)


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Compressed COCO RLE with `counts` as str, so it can be written to JSON."""
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def split_of_each_image(split_sizes: dict[str, int]) -> list[str]:
    """Split name for image ids 1, 2, ...: the first n_train are train, then val, then test."""
    return [name for name, n in split_sizes.items() for _ in range(n)]


def annotation(annotation_id: int, image_id: int, instance: Instance) -> dict[str, Any]:
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": instance.category_id,
        "bbox": tight_box(instance.mask),
        "area": int(instance.mask.sum()),
        "segmentation": encode_rle(instance.mask),
        "iscrowd": 0,
    }


def generate_shapes(
    out_dir: Path,
    *,
    seed: int,
    image_size: int,
    n_train: int,
    n_val: int,
    n_test: int,
    min_objects: int,
    max_objects: int,
    min_size: int,
    max_size: int,
) -> dict[str, Any]:
    """Write images/{id:06d}.png and instances_{split}.json under `out_dir`, atomically."""
    rng = np.random.default_rng(seed)
    split_sizes = {"train": n_train, "val": n_val, "test": n_test}
    coco = {
        split: {"images": [], "annotations": [], "categories": list(CATEGORIES)}
        for split in split_sizes
    }
    category_names = {c["id"]: c["name"] for c in CATEGORIES}
    objects_per_category = dict.fromkeys(category_names.values(), 0)
    n_annotations = n_dropped = 0
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        splits = split_of_each_image(split_sizes)
        for image_id, split in enumerate(tqdm(splits, desc="shapes", unit="img"), start=1):
            n_objects = int(rng.integers(min_objects, max_objects + 1))
            image, instances, dropped = draw_scene(rng, image_size, n_objects, min_size, max_size)
            n_dropped += dropped
            file_name = f"images/{image_id:06d}.png"
            save_png(image, tmp / file_name)
            coco[split]["images"].append(
                {"id": image_id, "file_name": file_name, "width": image_size, "height": image_size}
            )
            for instance in instances:
                n_annotations += 1
                coco[split]["annotations"].append(annotation(n_annotations, image_id, instance))
                objects_per_category[category_names[instance.category_id]] += 1
        for split, content in coco.items():
            write_json(tmp / f"instances_{split}.json", content)
    return {
        "images": split_sizes,
        "objects": n_annotations,
        "objects_per_category": objects_per_category,
        "dropped_objects": n_dropped,
    }

"""A COCO-format set that looks like real photos to the probes, made deterministically from a seed.

Unlike the project's small COCO fixture (`fixture_datasets.make_coco`: 1-3 flat objects that
never touch), this one has what makes real COCO hard for a spatial probe: photo-sized images of
several aspect ratios, textured backgrounds, 3-14 instances per image with objects down to COCO's
"small" size, groups of touching same-class instances (herds), later objects occluding earlier
ones (each annotation is the *visible* mask, as COCO's), hollow (ring, frame) and non-convex
(star, cross, crescent, ell) shapes, colours and textures that say nothing of the class, and 12
categories with sparse ids. Annotations are compressed RLE, iscrowd 0.

    python tests/realistic_coco.py --out coco_realistic --seed 0 --images 300 --workers 2

Each image is drawn from its own generator (seeded by the set's seed and the image's index), so
the set is the same for any number of workers.

then `dvc exp run -S data.dataset=coco -S data.coco.images=coco_realistic/val2017
-S data.coco.annotations=coco_realistic/annotations/instances_val2017.json` (README, Datasets).
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

SHAPES = ("disc", "ring", "square", "frame", "triangle", "star", "cross", "crescent", "ell",
          "hexagon", "diamond", "bar")
CATEGORIES = [{"id": 3 + 7 * k, "name": name, "supercategory": "shape"}
              for k, name in enumerate(SHAPES)]
SIZES = ((640, 480), (480, 640), (800, 600), (640, 360), (500, 500))  # (width, height)
ANNOTATIONS = "annotations/instances_val2017.json"
MIN_VISIBLE = 24  # pixels: an instance hidden below this is not annotated
SMALL_SIDE = 32  # COCO's "small": area below 32^2 pixels


REACH = 1.2  # every shape lies within this many radii of its centre


def window(cx: float, cy: float, r: float, height: int, width: int) -> tuple[slice, slice]:
    """The rows and columns of the image an instance can touch."""
    x0, x1 = max(int(cx - REACH * r), 0), min(int(cx + REACH * r) + 1, width)
    y0, y1 = max(int(cy - REACH * r), 0), min(int(cy + REACH * r) + 1, height)
    return slice(y0, max(y0, y1)), slice(x0, max(x0, x1))


def shape_mask(shape: str, cx: float, cy: float, r: float, angle: float,
               height: int, width: int) -> np.ndarray:
    """(H, W) bool mask of one instance: `shape` of radius `r` at (cx, cy), rotated by `angle`."""
    mask = np.zeros((height, width), dtype=bool)
    rows, cols = window(cx, cy, r, height, width)
    mask[rows, cols] = _shape_inside(shape, cx - cols.start, cy - rows.start, r, angle,
                                     rows.stop - rows.start, cols.stop - cols.start)
    return mask


def _shape_inside(shape: str, cx: float, cy: float, r: float, angle: float,
                  height: int, width: int) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    dx, dy = xs - cx, ys - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = (c * dx + s * dy) / r, (-s * dx + c * dy) / r  # rotated, in units of r
    d = np.hypot(u, v)
    theta = np.arctan2(v, u)

    def polygon(sides: int) -> np.ndarray:  # regular, inscribed in the unit circle
        sector = 2 * np.pi / sides
        local = (theta % sector) - sector / 2
        return d * np.cos(local) < np.cos(sector / 2)

    if shape == "disc":
        return d < 1
    if shape == "ring":
        return (d < 1) & (d > 0.55)
    if shape == "square":
        return np.maximum(abs(u), abs(v)) < 0.75
    if shape == "frame":
        m = np.maximum(abs(u), abs(v))
        return (m < 0.8) & (m > 0.5)
    if shape == "triangle":
        return polygon(3)
    if shape == "star":
        return d < 0.5 + 0.45 * np.cos(5 * theta)
    if shape == "cross":
        return ((abs(u) < 0.3) & (abs(v) < 1)) | ((abs(v) < 0.3) & (abs(u) < 1))
    if shape == "crescent":
        return (d < 1) & (np.hypot(u - 0.45, v) > 0.8)
    if shape == "ell":
        return (np.maximum(abs(u), abs(v)) < 0.8) & ~((u > -0.1) & (v < 0.1))
    if shape == "hexagon":
        return polygon(6)
    if shape == "diamond":
        return abs(u) + abs(v) < 1
    if shape == "bar":
        return (abs(u) < 1) & (abs(v) < 0.28)
    raise ValueError(f"unknown shape {shape!r}; one of {', '.join(SHAPES)}")


def smooth_field(rng: np.random.Generator, height: int, width: int, waves: int = 4) -> np.ndarray:
    """(H, W) sum of a few random low-frequency plane waves, in [-1, 1]."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    field = np.zeros((height, width), np.float32)
    for _ in range(waves):
        fx, fy = rng.uniform(-1, 1, 2) * rng.uniform(1, 6) / max(height, width)
        field += np.cos(2 * np.pi * (fx * xs + fy * ys) + rng.uniform(0, 2 * np.pi))
    return field / waves


def textured(rng: np.random.Generator, height: int, width: int, base: np.ndarray,
             strength: float) -> np.ndarray:
    """(H, W, 3) float colour `base` with a smooth texture and pixel noise."""
    texture = smooth_field(rng, height, width)[..., None] * rng.uniform(-1, 1, 3) * strength
    noise = rng.normal(0, 6, (height, width, 3))
    return base + texture + noise


def instance_layout(rng: np.random.Generator, width: int, height: int
                    ) -> list[tuple[int, float, float, float, float]]:
    """(category index, cx, cy, r, angle) of each instance, in painting order."""
    layout = []
    for _ in range(int(rng.integers(3, 11))):
        category = int(rng.integers(len(SHAPES)))
        r = float(np.exp(rng.uniform(np.log(8), np.log(110))))  # many small, some large
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        herd = int(rng.integers(2, 5)) if rng.random() < 0.35 else 1  # touching, same class
        heading = rng.uniform(0, 2 * np.pi)
        for k in range(herd):
            step = 1.75 * r * k  # neighbours' outlines meet or overlap a little
            layout.append((category, cx + step * np.cos(heading), cy + step * np.sin(heading),
                           r * rng.uniform(0.85, 1.15), float(rng.uniform(0, 2 * np.pi))))
    return layout


def make_image(rng: np.random.Generator, width: int, height: int
               ) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """One image and its (category index, visible mask) instances."""
    canvas = textured(rng, height, width, rng.uniform(40, 215, 3), strength=70)
    painted: list[tuple[int, np.ndarray]] = []
    for category, cx, cy, r, angle in instance_layout(rng, width, height):
        mask = shape_mask(SHAPES[category], cx, cy, r, angle, height, width)
        if not mask.any():
            continue
        rows, cols = window(cx, cy, r, height, width)
        paint = textured(rng, rows.stop - rows.start, cols.stop - cols.start,
                         rng.uniform(0, 255, 3), strength=40)
        canvas[rows, cols][mask[rows, cols]] = paint[mask[rows, cols]]
        for _, earlier in painted:
            earlier &= ~mask  # occluded by the later instance
        painted.append((category, mask))
    visible = [(c, m) for c, m in painted if m.sum() >= MIN_VISIBLE]
    return np.clip(canvas, 0, 255).astype(np.uint8), visible


def write_image(root: Path, index: int, seed: int, scale: float) -> tuple[dict, list[dict]]:
    """Draw image `index` of the set, save it, and return its COCO image record and its
    annotations (ids still to be numbered)."""
    rng = np.random.default_rng([seed, index])
    image_id = 100_003 + 11 * index
    width, height = (round(side * scale) for side in SIZES[index % len(SIZES)])
    pixels, instances = make_image(rng, width, height)
    annotations = []
    for category, mask in instances:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        annotations.append({
            "image_id": image_id, "category_id": CATEGORIES[category]["id"],
            "segmentation": {"size": [height, width], "counts": rle["counts"].decode()},
            "area": float(mask.sum()), "bbox": mask_utils.toBbox(rle).tolist(), "iscrowd": 0})
    file_name = f"{image_id:012d}.jpg"
    Image.fromarray(pixels).save(root / "val2017" / file_name, quality=92)
    return {"id": image_id, "file_name": file_name, "width": width, "height": height}, annotations


def make_realistic_coco(root: Path, n_images: int = 300, seed: int = 0,
                        scale: float = 1.0, workers: int = 1) -> Path:
    """Write the set under `root` (`val2017/*.jpg`, ANNOTATIONS); image sides times `scale`."""
    (root / "val2017").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    indices = range(n_images)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            drawn = list(pool.map(write_image, [root] * n_images, indices, [seed] * n_images,
                                  [scale] * n_images, chunksize=8))
    else:
        drawn = [write_image(root, index, seed, scale) for index in indices]
    images = [image for image, _ in drawn]
    annotations = [{"id": k + 1, **a}
                   for k, a in enumerate(a for _, per_image in drawn for a in per_image)]
    (root / ANNOTATIONS).write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--scale", type=float, default=1.0, help="image sides times this")
    parser.add_argument("--workers", type=int, default=1, help="processes drawing images")
    args = parser.parse_args()
    root = make_realistic_coco(args.out, args.images, args.seed, args.scale, args.workers)
    print(f"{args.images} images in {root / 'val2017'}, annotations {root / ANNOTATIONS}")


if __name__ == "__main__":
    main()

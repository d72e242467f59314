"""Moving shapes: short clips of one shape moving at constant speed in one of 8 directions.

A probe that recovers the direction from a model's tokens shows that motion survives in them.
Some clips add one static distractor shape, kept clear of the moving object's whole path.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from vlmprobe.data.shapes import (
    CATEGORIES,
    MIN_SHAPE_SIZE,
    place_square,
    random_background,
    random_shape,
    split_of_each_image,
    tight_box,
)
from vlmprobe.io import atomic_dir, write_json

# Direction d points at angle d * 45 degrees, counter-clockwise from east as seen on screen.
DIRECTIONS = ("E", "NE", "N", "NW", "W", "SW", "S", "SE")
DISTRACTOR_PROBABILITY = 0.5


@dataclass(frozen=True)
class ClipLabels:
    category_id: int
    boxes: list[list[int]]  # per frame [x, y, w, h] of the moving object
    distractor_box: list[int] | None


def object_size_range(image_size: int) -> tuple[int, int]:
    """Smallest and largest box side of a moving object, in px."""
    return max(MIN_SHAPE_SIZE, image_size // 8), max(MIN_SHAPE_SIZE, image_size // 5)


def max_speed(image_size: int, n_frames: int) -> int:
    """The highest speed (px/frame) at which the largest object stays inside the frame all clip."""
    return (image_size - object_size_range(image_size)[1]) // (n_frames - 1)


def frame_offsets(direction: int, speed: int, n_frames: int) -> np.ndarray:
    """(T, 2) int (dx, dy) from the first frame; y points down, so moving north lowers y.

    Offsets are rounded from exact positions rather than summed per-frame steps, so diagonal
    clips do not drift off their angle.
    """
    angle = np.deg2rad(45.0 * direction)
    unit = np.array([np.cos(angle), -np.sin(angle)])
    return np.rint(np.arange(n_frames)[:, None] * speed * unit).astype(int)


def draw_clip(
    rng: np.random.Generator, frames: np.ndarray, speed: int, direction: int
) -> ClipLabels:
    """Draw one clip into `frames` (T, H, W, 3) in place and return its labels."""
    n_frames, image_size = frames.shape[:2]
    background = random_background(rng)
    size_range = object_size_range(image_size)
    mover = random_shape(rng, background, *size_range)
    offsets = frame_offsets(direction, speed, n_frames)
    # Start where every offset keeps the object inside the frame.
    start = rng.integers(-offsets.min(axis=0), image_size - mover.size - offsets.max(axis=0) + 1)
    lowest, highest = start + offsets.min(axis=0), start + offsets.max(axis=0) + mover.size
    swept = (int(lowest[0]), int(lowest[1]), int(highest[0]), int(highest[1]))

    still = np.broadcast_to(background, (image_size, image_size, 3)).copy()
    distractor_box = None
    if rng.random() < DISTRACTOR_PROBABILITY:
        distractor = random_shape(rng, background, *size_range)
        box = place_square(rng, distractor.size, image_size, [swept])
        if box is not None:
            distractor_box = tight_box(distractor.paint(still, box[0], box[1]))

    frames[:] = still
    boxes = []
    for frame, (dx, dy) in zip(frames, offsets, strict=True):
        boxes.append(tight_box(mover.paint(frame, int(start[0] + dx), int(start[1] + dy))))
    return ClipLabels(mover.category_id, boxes, distractor_box)


def balanced_directions(rng: np.random.Generator, split_sizes: dict[str, int]) -> np.ndarray:
    """Direction per clip, each split cycling through all 8 so the classes stay balanced."""
    return np.concatenate(
        [rng.permutation(np.arange(n) % len(DIRECTIONS)) for n in split_sizes.values()]
    ).astype(np.int64)


def generate_moving_shapes(
    out_dir: Path,
    *,
    seed: int,
    image_size: int,
    n_train: int,
    n_val: int,
    n_test: int,
    n_frames: int,
    speed: int,
) -> dict[str, Any]:
    """Write clips.npz and clips.json under `out_dir`, atomically. Clip ids are row indices."""
    rng = np.random.default_rng(seed)
    split_sizes = {"train": n_train, "val": n_val, "test": n_test}
    directions = balanced_directions(rng, split_sizes)
    n_clips = len(directions)
    frames = np.empty((n_clips, n_frames, image_size, image_size, 3), dtype=np.uint8)
    clips = [
        draw_clip(rng, frames[clip_id], speed, int(directions[clip_id]))
        for clip_id in tqdm(range(n_clips), desc="moving shapes", unit="clip")
    ]
    split_names = split_of_each_image(split_sizes)
    metadata = {
        "directions": list(DIRECTIONS),
        "splits": {
            split: [i for i, name in enumerate(split_names) if name == split]
            for split in split_sizes
        },
        "boxes": [clip.boxes for clip in clips],
        "category_id": [clip.category_id for clip in clips],
        "distractor_boxes": [clip.distractor_box for clip in clips],
        "categories": list(CATEGORIES),
        "speed": speed,
    }
    with atomic_dir(out_dir) as tmp:
        np.savez_compressed(
            tmp / "clips.npz",
            frames=frames,
            direction=directions,
            clip_id=np.arange(n_clips, dtype=np.int64),
        )
        write_json(tmp / "clips.json", metadata)
    return {
        "clips": split_sizes,
        "frames_per_clip": n_frames,
        "distractors": sum(clip.distractor_box is not None for clip in clips),
    }

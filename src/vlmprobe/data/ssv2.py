"""A deterministic subset of a local Something-Something v2 copy, in the clip format.

SSv2 has no boxes, only a label per video. The direction probe uses the videos whose template
names a motion in the image plane, mapped onto the moving shapes' direction classes (E, N, W,
S); every other template (depth, rotation, camera motion, no motion) is left out. Templates are
matched on the labels file's `template` field, brackets removed, case ignored.

Subset: the matching videos in numeric id order, permuted by `seed`; the first n_train are
train, then val, then test. Each video is decoded with PyAV in a worker process; `n_frames`
frames evenly spaced over the whole video are kept and letterboxed to image_size. A missing,
unreadable or truncated video, or one with fewer frames than asked, is a bad sample
(vlmprobe.data.bad_samples); under `skip` the next video of the permutation takes its place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from vlmprobe.data.bad_samples import BadSample, apply_policy
from vlmprobe.data.coco import SourceError
from vlmprobe.data.letterbox import Letterbox
from vlmprobe.data.loader import describe_error, parallel_map
from vlmprobe.data.moving_shapes import DIRECTIONS
from vlmprobe.io import atomic_dir, read_json, write_json

# Template (brackets removed, lower case) -> direction name, as on screen.
DIRECTIONAL_TEMPLATES = {
    "pushing something from left to right": "E",
    "pulling something from left to right": "E",
    "pushing something from right to left": "W",
    "pulling something from right to left": "W",
    "moving something up": "N",
    "moving something down": "S",
}
VIDEO_SUFFIX = ".webm"
# A video whose last decoded frame ends this many frame intervals before the duration its
# header states is cut short.
TRUNCATION_FRAMES = 2


def template_direction(template: str) -> str | None:
    key = " ".join(template.replace("[", "").replace("]", "").lower().split())
    return DIRECTIONAL_TEMPLATES.get(key)


def read_labels(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise SourceError(f"labels file {path} not found. Fix: set data.ssv2.labels to your "
                          "labels/validation.json.")
    try:
        labels = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise SourceError(f"labels file {path} is not valid JSON ({e}).") from None
    if not isinstance(labels, list) or not all(
            isinstance(e, dict) and {"id", "template"} <= set(e) for e in labels):
        raise SourceError(f"labels file {path} is not SSv2's format: expected a list of "
                          "{id, label, template, placeholders} entries.")
    return labels


@dataclass(frozen=True)
class VideoTask:
    video_id: str
    path: Path
    n_frames: int
    size: int


def decode_frames(path: Path) -> tuple[list[Image.Image], float | None, float | None]:
    """Every frame of the first video stream, its stated duration (s) and frame rate."""
    import av  # here, not at the top: only SSv2 needs PyAV, so the data stage runs without it

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate) if stream.average_rate else None
        duration = container.duration / av.time_base if container.duration else None
        frames, last_time = [], None
        for frame in container.decode(stream):
            frames.append(frame.to_image())
            last_time = frame.time
    decoded_end = 0.0 if last_time is None else last_time + 1 / (rate or 1)
    if duration and rate and decoded_end + (TRUNCATION_FRAMES - 1) / rate < duration:
        raise EOFError(f"truncated: {len(frames)} frames decode, {decoded_end:.2f} s of the "
                       f"{duration:.2f} s its header states")
    return frames, duration, rate


def prepare_video(task: VideoTask) -> np.ndarray | BadSample:
    """(n_frames, size, size, 3) uint8 evenly spaced, letterboxed frames, or what is bad."""
    import av

    if not task.path.is_file():
        return BadSample(str(task.path), "file not found")
    try:
        frames, _, _ = decode_frames(task.path)
    except (av.error.FFmpegError, EOFError, OSError, IndexError) as e:
        return BadSample(str(task.path), f"unreadable video ({describe_error(e)})")
    if len(frames) < task.n_frames:
        return BadSample(str(task.path), f"has {len(frames)} frames, fewer than "
                                         f"data.ssv2.n_frames = {task.n_frames}")
    pick = np.linspace(0, len(frames) - 1, task.n_frames).round().astype(int)
    box = Letterbox(frames[0].width, frames[0].height, task.size)
    return np.stack([box.image(frames[i]) for i in pick])


def check_source(videos_dir: Path, labels: Path, wanted: int) -> list[dict[str, Any]]:
    """The source's checks that decode no video (`vlmprobe validate` makes them in seconds):
    both paths exist and the labels list `wanted` videos of the directional templates.
    Returns those entries in numeric id order."""
    if not Path(videos_dir).is_dir():
        raise SourceError(f"video directory {videos_dir} not found. Fix: set data.ssv2.videos "
                          "to the directory of <id>.webm files.")
    entries = [e for e in read_labels(Path(labels)) if template_direction(e["template"])]
    if len(entries) < wanted:
        raise SourceError(
            f"{labels} lists {len(entries)} videos of the directional templates, fewer than the "
            f"{wanted} asked for (data.ssv2.n_train + n_val + n_test). Fix: lower them to "
            f"{len(entries)} in all.")
    return sorted(entries, key=lambda e: int(e["id"]))


def write_ssv2_subset(
    out_dir: Path,
    *,
    videos_dir: Path,
    labels: Path,
    seed: int,
    image_size: int,
    n_frames: int,
    n_train: int,
    n_val: int,
    n_test: int,
    on_bad_sample: str,
    workers: int,
) -> dict[str, Any]:
    """Write clips.npz and clips.json (the moving shapes' format, without boxes) atomically."""
    entries = check_source(videos_dir, labels, n_train + n_val + n_test)
    order = [entries[i] for i in np.random.default_rng(seed).permutation(len(entries))]
    split_sizes = {"train": n_train, "val": n_val, "test": n_test}
    wanted = sum(split_sizes.values())
    chosen: list[tuple[dict, np.ndarray]] = []
    bad: list[BadSample] = []
    skipped = apply_policy(bad, on_bad_sample)
    position = 0
    # Under `skip`, each round replaces the bad samples of the last with the next videos.
    while len(chosen) < wanted and position < len(order):
        batch = order[position : position + wanted - len(chosen)]
        position += len(batch)
        tasks = [VideoTask(str(e["id"]), Path(videos_dir) / f"{e['id']}{VIDEO_SUFFIX}",
                           n_frames, image_size) for e in batch]
        for entry, result in zip(batch, parallel_map(prepare_video, tasks, workers,
                                                     desc="ssv2", unit="clip"), strict=True):
            if isinstance(result, BadSample):
                bad.append(result)
            else:
                chosen.append((entry, result))
        skipped = apply_policy(bad, on_bad_sample)
    if len(chosen) < wanted:
        raise SourceError(
            f"{labels} has {len(chosen)} usable videos of the directional templates, fewer than "
            f"the {wanted} asked for (data.ssv2.n_train + n_val + n_test). Fix: lower them.")
    directions = np.array([DIRECTIONS.index(template_direction(e["template"]))
                           for e, _ in chosen], dtype=np.int64)
    split_of = [name for name, n in split_sizes.items() for _ in range(n)]
    metadata = {
        "source": "ssv2",
        "directions": list(DIRECTIONS),
        "splits": {s: [i for i, name in enumerate(split_of) if name == s] for s in split_sizes},
        "video_ids": [str(e["id"]) for e, _ in chosen],
        "templates": [e["template"] for e, _ in chosen],
        "labels": [e.get("label", e["template"]) for e, _ in chosen],
    }
    with atomic_dir(out_dir) as tmp:
        np.savez_compressed(tmp / "clips.npz", frames=np.stack([f for _, f in chosen]),
                            direction=directions,
                            clip_id=np.arange(len(chosen), dtype=np.int64))
        write_json(tmp / "clips.json", metadata)
    counts = np.bincount(directions, minlength=len(DIRECTIONS))
    return {
        "clips": split_sizes,
        "frames_per_clip": n_frames,
        "per_direction": {d: int(counts[i]) for i, d in enumerate(DIRECTIONS) if counts[i]},
        "skipped": skipped,
    }

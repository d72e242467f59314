"""What the alignment study reads: the probed images, or frames of the clips (the plan's 1000
Something-Something v2 frames when `data.dataset: ssv2`), with their tokens' feature store and
train/val/test rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlmprobe.align.study import SPLIT_NAMES
from vlmprobe.data.dataset import load_split
from vlmprobe.extract.store import FeatureStore
from vlmprobe.io import read_json
from vlmprobe.params import ParamsError

SOURCES = ("images", "clip_frames")


@dataclass(frozen=True)
class AlignInputs:
    store: FeatureStore
    image_ids: list[int]  # the store's ids, train then val then test
    images: np.ndarray  # (N, H, W, 3) uint8, in image_ids order
    split_of: dict[str, np.ndarray]  # split -> rows of image_ids
    dataset: str  # what the rows are, for the metrics' meta


def _split_rows(sizes: list[int]) -> dict[str, np.ndarray]:
    bounds = np.cumsum([0, *sizes])
    return {s: np.arange(bounds[i], bounds[i + 1]) for i, s in enumerate(SPLIT_NAMES)}


def image_inputs(data: Path, features: Path) -> AlignInputs:
    splits = [load_split(data, s) for s in SPLIT_NAMES]
    return AlignInputs(
        store=FeatureStore.open(features),
        image_ids=[i for s in splits for i in s.image_ids],
        images=np.concatenate([s.images for s in splits]),
        split_of=_split_rows([len(s.image_ids) for s in splits]),
        dataset=str(data),
    )


def frame_indices(n_frames: int, per_clip: int) -> list[int]:
    """`per_clip` frame indices evenly spaced over a clip of `n_frames` (first and last kept)."""
    if not 1 <= per_clip <= n_frames:
        raise ParamsError(f"params.yaml: align.frames_per_clip = {per_clip} does not fit clips "
                          f"of {n_frames} frames; choose 1 to {n_frames}. Fix: "
                          f"`-S align.frames_per_clip={min(2, n_frames)}`.")
    return sorted({round(float(t)) for t in np.linspace(0, n_frames - 1, per_clip)})


def clip_frame_inputs(clips: Path, clip_features: Path, per_clip: int) -> AlignInputs:
    """`per_clip` evenly spaced frames of every clip; a clip's frames stay in its split, so no
    clip is on both sides of a train/test boundary."""
    store = FeatureStore.open(clip_features)
    n_frames = int(store.manifest["n_frames"])
    chosen = frame_indices(n_frames, per_clip)
    splits = read_json(clips / "clips.json")["splits"]
    with np.load(clips / "clips.npz") as z:
        frames = z["frames"]
    rows = [(int(c), t) for s in SPLIT_NAMES for c in splits[s] for t in chosen]
    return AlignInputs(
        store=store,
        image_ids=[c * n_frames + t for c, t in rows],  # the extract stage's frame ids
        images=np.stack([frames[c, t] for c, t in rows]),
        split_of=_split_rows([len(splits[s]) * len(chosen) for s in SPLIT_NAMES]),
        dataset=f"{clips} (frames {', '.join(map(str, chosen))} of each clip)",
    )

"""What every trained (gradient-descent) probe shares: deterministic CPU torch, token inputs
laid out on their grids, batches, and training curves logged with dvclive."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from dvclive import Live

from vlmprobe.extract.geometry import TokenGeometry


@contextmanager
def deterministic_torch(seed: int, threads: int) -> Iterator[torch.Generator]:
    """Seeded, deterministic, fixed-thread-count torch for one training run.

    Matrix products on CPU sum in an order that depends on the thread count, so the count is
    fixed (a params value) for results to repeat exactly; the previous settings are restored.
    """
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield torch.Generator().manual_seed(seed)
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)


def batches(
    n: int, batch_size: int, steps: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """`steps` batches of indices into range(n), epoch by epoch in seeded random order."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def warmup_cosine(step: int, steps: int, warmup: int, floor: float = 0.05) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class Standardizer:
    """Per-dimension standardisation with train-split statistics (so a token keeps its relative
    scale; per-token normalisation would blow background noise up to the size of a signal)."""

    def __init__(self, train: np.ndarray):
        flat = train.reshape(-1, train.shape[-1]).astype(np.float64)
        self.mean = flat.mean(axis=0).astype(np.float32)
        self.std = np.maximum(flat.std(axis=0), 1e-6).astype(np.float32)

    def __call__(self, tokens: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((tokens - self.mean) / self.std)


def token_centres(geometry: TokenGeometry) -> np.ndarray:
    """(T, 2) token centres (x, y) as fractions of the image width and height."""
    h, w = geometry.image_size
    boxes = geometry.token_boxes()
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2 / w, (boxes[:, 1] + boxes[:, 3]) / 2 / h], 1)


def mirror_permutation(geometry: TokenGeometry) -> np.ndarray | None:
    """Token order of the horizontally mirrored image (token i goes where token perm[i] was),
    or None when some token has no mirror-image partner (flip augmentation is then off)."""
    w = geometry.image_size[1]
    boxes = geometry.token_boxes()
    mirrored = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
    distance = np.abs(mirrored[:, None, :] - boxes[None, :, :]).sum(axis=-1)
    partner = distance.argmin(axis=1)
    if distance[np.arange(len(boxes)), partner].max() > 1e-3:
        return None
    return partner


def to_grids(tokens: torch.Tensor, geometry: TokenGeometry) -> list[torch.Tensor]:
    """(B, T, C) tokens in storage order -> one (B, C, rows, cols) map per grid."""
    maps, start = [], 0
    for g in geometry.grids:
        block = tokens[:, start : start + g.n_tokens]
        start += g.n_tokens
        maps.append(block.reshape(len(tokens), g.rows, g.cols, -1).permute(0, 3, 1, 2))
    return maps


def from_grids(maps: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of `to_grids`: per-grid (B, C, rows, cols) maps -> (B, T, C)."""
    return torch.cat([m.flatten(2).transpose(1, 2) for m in maps], dim=1)


class Curves:
    """Training curves for one probe run, logged with dvclive (no dvc.yaml or experiment of its
    own: the stage's dvc.yaml declares the directory as plots)."""

    def __init__(self, directory: Path):
        self.live = Live(str(directory), dvcyaml=None, save_dvc_exp=False, report=None)

    def log(self, step: int, **values: float) -> None:
        self.live.step = step
        for name, value in values.items():
            self.live.log_metric(name, round(float(value), 6), plot=True)
        self.live.next_step()

    def close(self) -> None:
        self.live.end()

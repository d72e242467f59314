"""The reconstruction decoder (E-P4.1 step 4): tokens on their grid -> the image.

Capacity: a 1x1 convolution projects the (standardised) tokens to `width` channels, `depth`
3x3 convolutions (GroupNorm, GELU) mix neighbouring tokens, and a 1x1 convolution predicts each
token's patch of pixels (`patch_px` squared, RGB), which are tiled (pixel shuffle) and resized
to the token's region; one 3x3 convolution at full resolution smooths the seams. Trained with
an L1 loss on RGB in [0, 1]. The decoder is local (every output pixel sees only nearby tokens),
so token *positions* decide where content lands: shuffled tokens cannot be put back.

Only the first grid of an extraction point (the one covering the whole image) is decoded.

Scores on the test split, each with a bootstrap 95% interval over images:
- `lpips`: LPIPS (AlexNet, the real weights from the `assets` stage), mean over images;
- `ssim`, `edge_f1`: see `vlmprobe.metrics.image`;
- `spatial_iou`: object masks recovered from the reconstruction by nearest-colour assignment to
  the original's palette (background colour and each object's colour; see
  `vlmprobe.metrics.image.recover_masks`) against the ground-truth masks, mean over objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmprobe.data.dataset import Split
from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.extract.tokens import Tokens
from vlmprobe.metrics.boxes import bootstrap_ci, ratio_of_sums
from vlmprobe.metrics.image import Lpips, edge_f1, spatial_iou, ssim
from vlmprobe.probes.registry import ProbeResult, TokenSet
from vlmprobe.probes.training import (
    DeviceBatches,
    Evaluation,
    FitSettings,
    Standardizer,
    deterministic_torch,
    device_images,
    device_tokens,
    fit,
    to_grids,
    to_uint8,
)


@dataclass(frozen=True)
class ScoreSettings:
    """How reconstructions are scored (here and in the reconstruct stage, so both score alike)."""

    edge_threshold: float
    edge_tolerance: int
    bootstrap: int
    seed: int


@dataclass(frozen=True)
class ReconstructionSettings:
    fit: FitSettings  # no gradient clipping; the checkpoint with the lowest val L1 is kept
    width: int
    depth: int
    patch_px: int
    scores: ScoreSettings


class Decoder(nn.Module):
    def __init__(self, in_dim: int, width: int, depth: int, patch_px: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_dim, width, 1)]
        for _ in range(depth):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.GELU()]
        layers.append(nn.Conv2d(width, 3 * patch_px * patch_px, 1))
        layers.append(nn.PixelShuffle(patch_px))
        self.decode = nn.Sequential(*layers)
        self.smooth = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, tokens: torch.Tensor, geometry: TokenGeometry) -> torch.Tensor:
        """tokens (B, T, D) -> images (B, 3, H, W) in about [0, 1]."""
        grid = geometry.grids[0]
        h, w = geometry.image_size
        x0, y0, x1, y1 = (int(round(v)) for v in grid.box)
        patches = self.decode(to_grids(tokens, geometry)[0])
        if patches.shape[-2:] != (y1 - y0, x1 - x0):
            patches = F.interpolate(patches, size=(y1 - y0, x1 - x0), mode="bilinear")
        canvas = F.pad(patches, (x0, w - x1, y0, h - y1))
        return canvas + self.smooth(canvas)


RECONSTRUCT_BATCH = 32  # also the most test reconstructions kept for figures


def reconstructions(model: Decoder, tokens: DeviceBatches, geometry: TokenGeometry
                    ) -> Iterator[np.ndarray]:
    """(B, H, W, 3) uint8 reconstructions of every image in order, RECONSTRUCT_BATCH at a time."""
    model.eval()
    try:
        for batch in tokens.in_order(RECONSTRUCT_BATCH):
            with torch.no_grad():
                yield to_uint8(model(batch, geometry))
    finally:
        model.train()


def mean_abs_difference(chunks: Iterable[np.ndarray], images: np.ndarray) -> float:
    """Mean |reconstruction - original| in [0, 1] units; `chunks` are consecutive batches of
    reconstructions of `images` (N, H, W, 3) uint8."""
    total, count, start = 0.0, 0, 0
    for r in chunks:
        o = images[start : start + len(r)]
        start += len(r)
        total += float(np.abs(r.astype(np.float64) / 255.0 - o / 255.0).sum())
        count += r.size
    return total / count


def image_scores(
    chunks: Iterable[np.ndarray], split: Split, lpips: Lpips, settings: ScoreSettings
) -> dict:
    """Test-split scores (see the module docstring) with seeded bootstrap intervals; `chunks`
    are consecutive batches of reconstructions of the split's images (or all of them in one)."""
    per_image: dict[str, list] = {"lpips": [], "ssim": [], "edge_f1": []}
    object_scores: list[list[float]] = []
    start = 0
    for r in chunks:
        originals = split.images[start : start + len(r)]
        masks = split.masks[start : start + len(r)]
        start += len(r)
        per_image["lpips"].extend(lpips(r, originals))
        per_image["ssim"].extend(ssim(a, b) for a, b in zip(r, originals, strict=True))
        per_image["edge_f1"].extend(
            edge_f1(a, b, settings.edge_threshold, settings.edge_tolerance)
            for a, b in zip(r, originals, strict=True))
        object_scores.extend(spatial_iou(a, b, m)
                             for a, b, m in zip(r, originals, masks, strict=True))
    if start != len(split.images):
        raise ValueError(f"{start} reconstructions of the {len(split.images)} {split.name} "
                         "images")
    ones = np.ones(len(split.images))
    result = {}
    for name, values in per_image.items():
        values = np.asarray(values, dtype=np.float64)
        result[name] = float(values.mean())
        result[f"{name}_ci95"] = list(bootstrap_ci(values, ones, settings.bootstrap, settings.seed))
    sums = np.array([sum(s) for s in object_scores])
    counts = np.array([len(s) for s in object_scores])
    result["spatial_iou"] = ratio_of_sums(sums, counts)
    result["spatial_iou_ci95"] = list(
        bootstrap_ci(sums, counts, settings.bootstrap, settings.seed)
    )
    return result


def run_reconstruction_probe(
    features: dict[str, Tokens | np.ndarray],
    splits: dict[str, Split],
    geometry: TokenGeometry,
    lpips: Lpips,
    settings: ReconstructionSettings,
    curves_dir: Path,
) -> tuple[dict, np.ndarray]:
    """Train on train, pick the checkpoint by val L1, report the test scores.

    Returns the metrics and the first RECONSTRUCT_BATCH test reconstructions (B, H, W, 3)
    uint8 (for figures); the others are scored a batch at a time and dropped.
    """
    device = settings.fit.device
    standardize = Standardizer(features["train"])
    x = {name: device_tokens(f, standardize, device) for name, f in features.items()}
    train_images = device_images(splits["train"].images, device)

    def step_loss(model, index, generator, step):
        return F.l1_loss(model(x["train"].batch(index), geometry), train_images.batch(index))

    def evaluate(model, step, train_loss):
        val_l1 = mean_abs_difference(reconstructions(model, x["val"], geometry),
                                     splits["val"].images)
        return Evaluation(val_l1, {"train_l1": train_loss, "val_l1": val_l1})

    fitted = fit(lambda: Decoder(x["train"].shape[-1], settings.width, settings.depth,
                                 settings.patch_px),
                 len(x["train"]), step_loss, evaluate, settings.fit, curves_dir,
                 "reconstruction")
    fs = settings.fit
    kept: list[np.ndarray] = []

    def test_chunks() -> Iterator[np.ndarray]:
        for chunk in reconstructions(fitted.model, x["test"], geometry):
            if not kept:
                kept.append(chunk)
            yield chunk

    with deterministic_torch(fs.seed, fs.threads, fs.device):
        metrics = image_scores(test_chunks(), splits["test"], lpips, settings.scores)
    metrics["val_l1"] = fitted.score
    metrics["selected_step"] = fitted.step
    return metrics, kept[0]


def run(tokens: TokenSet, settings: ReconstructionSettings, curves_dir: Path) -> ProbeResult:
    """The reconstruction decoder as the registry runs it (`vlmprobe.probes.registry`)."""
    metrics, kept = run_reconstruction_probe(tokens.features, tokens.splits, tokens.geometry,
                                             tokens.lpips(), settings, curves_dir)
    return ProbeResult(metrics, reconstructions=kept)

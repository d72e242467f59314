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

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vlmprobe.data.dataset import Split
from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.metrics.boxes import bootstrap_ci, ratio_of_sums
from vlmprobe.metrics.image import Lpips, edge_f1, spatial_iou, ssim
from vlmprobe.probes.training import (
    Curves,
    Standardizer,
    batches,
    deterministic_torch,
    to_grids,
    warmup_cosine,
)


@dataclass(frozen=True)
class ReconstructionSettings:
    steps: int
    batch_size: int
    lr: float
    width: int
    depth: int
    patch_px: int
    edge_threshold: float
    edge_tolerance: int
    eval_every: int
    threads: int
    seed: int
    bootstrap: int


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


def to_images(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float -> (B, H, W, 3) uint8."""
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def reconstruct(model: Decoder, tokens: torch.Tensor, geometry: TokenGeometry,
                batch_size: int = 32) -> np.ndarray:
    model.eval()
    out = [to_images(model(tokens[s : s + batch_size], geometry))
           for s in range(0, len(tokens), batch_size)]
    model.train()
    return np.concatenate(out)


def image_scores(
    reconstructions: np.ndarray, split: Split, lpips: Lpips, settings: ReconstructionSettings
) -> dict:
    """Test-split scores (see the module docstring) with seeded bootstrap intervals."""
    per_image = {
        "lpips": lpips(reconstructions, split.images),
        "ssim": np.array([ssim(r, o) for r, o in zip(reconstructions, split.images, strict=True)]),
        "edge_f1": np.array([
            edge_f1(r, o, settings.edge_threshold, settings.edge_tolerance)
            for r, o in zip(reconstructions, split.images, strict=True)
        ]),
    }
    ones = np.ones(len(split.images))
    result = {}
    for name, values in per_image.items():
        result[name] = float(values.mean())
        result[f"{name}_ci95"] = list(bootstrap_ci(values, ones, settings.bootstrap, settings.seed))
    object_scores = [
        spatial_iou(r, o, m) for r, o, m in zip(reconstructions, split.images, split.masks,
                                                  strict=True)
    ]
    sums = np.array([sum(s) for s in object_scores])
    counts = np.array([len(s) for s in object_scores])
    result["spatial_iou"] = ratio_of_sums(sums, counts)
    result["spatial_iou_ci95"] = list(
        bootstrap_ci(sums, counts, settings.bootstrap, settings.seed)
    )
    return result


def run_reconstruction_probe(
    features: dict[str, np.ndarray],
    splits: dict[str, Split],
    geometry: TokenGeometry,
    lpips: Lpips,
    settings: ReconstructionSettings,
    curves_dir: Path,
) -> tuple[dict, np.ndarray]:
    """Train on train, pick the checkpoint by val L1, report the test scores.

    Returns the metrics and the test reconstructions (N, H, W, 3) uint8 (for figures).
    """
    standardize = Standardizer(features["train"])
    x = {name: standardize(f) for name, f in features.items()}
    images = {
        name: torch.from_numpy(s.images).permute(0, 3, 1, 2).float() / 255.0
        for name, s in splits.items()
    }
    with deterministic_torch(settings.seed, settings.threads) as generator:
        model = Decoder(x["train"].shape[-1], settings.width, settings.depth, settings.patch_px)
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, settings.steps, settings.steps // 20)
        )
        curves = Curves(curves_dir)
        best = (float("inf"), None, 0)
        running = 0.0
        progress = tqdm(
            enumerate(batches(len(x["train"]), settings.batch_size, settings.steps, generator)),
            total=settings.steps, desc="reconstruction", unit="step", mininterval=5,
        )
        for step, index in progress:
            loss = F.l1_loss(model(x["train"][index], geometry), images["train"][index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            running += loss.item()
            if (step + 1) % settings.eval_every == 0 or step + 1 == settings.steps:
                val = reconstruct(model, x["val"], geometry).astype(np.float64) / 255.0
                val_l1 = float(np.abs(val - splits["val"].images / 255.0).mean())
                curves.log(step + 1, train_l1=running / settings.eval_every, val_l1=val_l1)
                running = 0.0
                if val_l1 < best[0]:
                    best = (val_l1, copy.deepcopy(model.state_dict()), step + 1)
        curves.close()
        model.load_state_dict(best[1])
        test = reconstruct(model, x["test"], geometry)
    metrics = image_scores(test, splits["test"], lpips, settings)
    metrics["reconstruction_val_l1"] = best[0]
    metrics["reconstruction_selected_step"] = best[2]
    return metrics, test

"""Training an adapter through the target's frozen decoder (E-P4.6).

Loss on decoded images: LPIPS (AlexNet, real weights) + l2_weight * mean squared error, both on
RGB (LPIPS sees [-1, 1], the squared error [0, 1]); AdamW; batches of seeded random order.
`warmup_epochs` first train on the squared-error term alone: on CPU each LPIPS step costs
seconds, so the default run spends most of its steps there and only its last epochs on the full
loss (the plan's setting is warmup_epochs 0, 50 epochs of 5000 samples). The final weights are
kept; the curves (dvclive) show train loss per epoch and the val loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.probes.training import Curves, Standardizer, batches, deterministic_torch
from vlmprobe.reconstruct.adapters import build_adapter, n_parameters
from vlmprobe.vae.base import VideoVAE


@dataclass(frozen=True)
class TrainSettings:
    adapter: str
    adapter_params: int
    warmup_epochs: int
    epochs: int
    train_samples: int
    batch_size: int
    lr: float
    l2_weight: float
    threads: int
    seed: int


@dataclass
class TrainedAdapter:
    adapter: nn.Module
    standardize: Standardizer
    vae: VideoVAE
    latent: TokenGeometry

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        grid = self.latent.grids[0]
        return self.vae.decode_tokens(self.adapter(tokens), grid.rows, grid.cols)

    @torch.no_grad()
    def reconstruct(self, tokens: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """(N, T, D) model tokens -> (N, H, W, 3) uint8 reconstructions."""
        self.adapter.eval()
        x = self.standardize(tokens)
        out = [to_uint8(self.decode(x[s : s + batch_size])) for s in range(0, len(x), batch_size)]
        self.adapter.train()
        return np.concatenate(out)


def to_unit(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def reconstruction_loss(decoded: torch.Tensor, images: torch.Tensor, lpips: nn.Module | None,
                        l2_weight: float) -> torch.Tensor:
    """LPIPS + l2_weight * MSE (LPIPS left out when `lpips` is None: the warm-up loss)."""
    loss = l2_weight * F.mse_loss(decoded, images)
    if lpips is not None:
        loss = loss + lpips(decoded * 2.0 - 1.0, images * 2.0 - 1.0).mean()
    return loss


def train_adapter(
    tokens: dict[str, np.ndarray],
    images: dict[str, np.ndarray],
    geometry: TokenGeometry,
    vae: VideoVAE,
    lpips: nn.Module,
    settings: TrainSettings,
    curves_dir: Path,
    label: str,
) -> tuple[TrainedAdapter, dict]:
    """Fit an adapter on the first `train_samples` train images; returns it and a summary."""
    n = min(settings.train_samples, len(tokens["train"]))
    standardize = Standardizer(tokens["train"][:n])
    x_train, y_train = standardize(tokens["train"][:n]), to_unit(images["train"][:n])
    x_val, y_val = standardize(tokens["val"]), to_unit(images["val"])
    latent = vae.latent_geometry(images["train"].shape[1:3])
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total_epochs = settings.warmup_epochs + settings.epochs
    with deterministic_torch(settings.seed, settings.threads) as generator:
        adapter = build_adapter(settings.adapter, geometry, latent, x_train.shape[-1],
                                vae.latent_channels, settings.adapter_params)
        trained = TrainedAdapter(adapter, standardize, vae, latent)
        optimizer = torch.optim.AdamW(adapter.parameters(), lr=settings.lr)
        curves = Curves(curves_dir / label)
        order = batches(n, settings.batch_size, steps_per_epoch * total_epochs, generator)
        progress = tqdm(range(total_epochs), desc=f"reconstruct {label}", unit="epoch")
        for epoch in progress:
            full_loss = epoch >= settings.warmup_epochs
            running = 0.0
            for _ in range(steps_per_epoch):
                index = next(order)
                loss = reconstruction_loss(trained.decode(x_train[index]), y_train[index],
                                           lpips if full_loss else None, settings.l2_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                running += loss.item()
            with torch.no_grad():
                adapter.eval()
                val = reconstruction_loss(trained.decode(x_val), y_val,
                                          lpips if full_loss else None, settings.l2_weight)
                adapter.train()
            phase = "full" if full_loss else "warmup"
            curves.log(epoch + 1, **{f"train_loss_{phase}": running / steps_per_epoch,
                                     f"val_loss_{phase}": val.item()})
        curves.close()
    summary = {"adapter": settings.adapter, "adapter_parameters": n_parameters(adapter),
               "train_samples": n, "steps": steps_per_epoch * total_epochs}
    return trained, summary

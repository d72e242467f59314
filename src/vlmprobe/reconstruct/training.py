"""Training an adapter through the target's frozen decoder (E-P4.6).

Loss on decoded images: LPIPS (AlexNet, real weights) + l2_weight * mean squared error, both on
RGB (LPIPS sees [-1, 1], the squared error [0, 1]); AdamW; batches of seeded random order.
`warmup_epochs` first train on the squared-error term alone: on CPU each LPIPS step costs
seconds, so the default run spends most of its steps there and only its last epochs on the full
loss (the plan's setting is warmup_epochs 0, 50 epochs of 5000 samples). The final weights are
kept; the curves (dvclive) show train loss per epoch and the val loss, at each epoch's last step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.probes.training import (
    CPU,
    Evaluation,
    FitSettings,
    Standardizer,
    fit,
    to_uint8,
    to_unit,
)
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
    device: torch.device = CPU

    def fit_settings(self, n: int) -> FitSettings:
        """The fit loop's settings for `n` training samples: one evaluation per epoch, the
        final weights kept, AdamW's default weight decay, no schedule, no clipping."""
        steps_per_epoch = math.ceil(n / self.batch_size)
        return FitSettings(
            steps=steps_per_epoch * (self.warmup_epochs + self.epochs),
            batch_size=self.batch_size, lr=self.lr, eval_every=steps_per_epoch,
            seed=self.seed, threads=self.threads, device=self.device, weight_decay=0.01,
            clip_norm=None, schedule="constant", keep="last", higher_is_better=False,
        )


@dataclass
class TrainedAdapter:
    adapter: nn.Module
    standardize: Standardizer
    vae: VideoVAE
    latent: TokenGeometry

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return decode_through(self.adapter, self.vae, self.latent, tokens)

    @torch.no_grad()
    def reconstruct(self, tokens: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """(N, T, D) model tokens -> (N, H, W, 3) uint8 reconstructions."""
        self.adapter.eval()
        device = next(self.adapter.parameters()).device
        x = self.standardize(tokens)
        out = [to_uint8(self.decode(x[s : s + batch_size].to(device)))
               for s in range(0, len(x), batch_size)]
        self.adapter.train()
        return np.concatenate(out)


def decode_through(adapter: nn.Module, vae: VideoVAE, latent: TokenGeometry,
                   tokens: torch.Tensor) -> torch.Tensor:
    """Model tokens -> the adapter's latents -> images through the frozen decoder."""
    grid = latent.grids[0]
    return vae.decode_tokens(adapter(tokens), grid.rows, grid.cols)


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
    """Fit an adapter on the first `train_samples` train images; returns it and a summary.
    `vae` and `lpips` must be on `settings.device`."""
    n = min(settings.train_samples, len(tokens["train"]))
    standardize = Standardizer(tokens["train"][:n])
    x_train, y_train = standardize(tokens["train"][:n]), to_unit(images["train"][:n])
    x_val, y_val = standardize(tokens["val"]), to_unit(images["val"])
    latent = vae.latent_geometry(images["train"].shape[1:3])
    fit_settings = settings.fit_settings(n)
    device = settings.device

    def full_loss(step: int) -> bool:
        return step // fit_settings.eval_every >= settings.warmup_epochs

    def step_loss(adapter, index, generator, step):
        return reconstruction_loss(decode_through(adapter, vae, latent, x_train[index].to(device)),
                                   y_train[index].to(device),
                                   lpips if full_loss(step) else None, settings.l2_weight)

    def evaluate(adapter, step, train_loss):
        full = full_loss(step - 1)
        val = reconstruction_loss(decode_through(adapter, vae, latent, x_val.to(device)),
                                  y_val.to(device),
                                  lpips if full else None, settings.l2_weight).item()
        phase = "full" if full else "warmup"
        return Evaluation(val, {f"train_loss_{phase}": train_loss, f"val_loss_{phase}": val})

    fitted = fit(lambda: build_adapter(settings.adapter, geometry, latent, x_train.shape[-1],
                                       vae.latent_channels, settings.adapter_params),
                 n, step_loss, evaluate, fit_settings, curves_dir / label, f"reconstruct {label}")
    trained = TrainedAdapter(fitted.model, standardize, vae, latent)
    summary = {"adapter": settings.adapter, "adapter_parameters": n_parameters(fitted.model),
               "train_samples": n, "steps": fit_settings.steps}
    return trained, summary

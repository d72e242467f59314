"""What every video-VAE target offers: normalised latents of single frames, and a
differentiable decoder from latents back to images."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.vae.registry import VaeEntry, VaeError


class VideoVAE(ABC):
    compression: int  # pixels per latent cell along each side
    latent_channels: int

    def __init__(self, entry: VaeEntry):
        self.entry = entry

    def latent_geometry(self, image_size: tuple[int, int]) -> TokenGeometry:
        """The latent grid as token geometry: latent position (r, c) covers that image cell."""
        h, w = image_size
        if h % self.compression or w % self.compression:
            raise VaeError(
                f"video_vae {self.entry.name!r} needs image sides divisible by "
                f"{self.compression}, got {h}x{w}. Fix: set data.image_size to a multiple of "
                f"{self.compression} (224, 256, 448, ...)."
            )
        return TokenGeometry.single_grid((h, w), h // self.compression, w // self.compression)

    def to(self, device: torch.device) -> VideoVAE:
        """Move the decoder's weights (if it has any) to `device`; returns self."""
        return self

    @abstractmethod
    def encode_batch(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised latents (B, C, rows, cols)."""

    @abstractmethod
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, C, rows, cols) -> images (B, 3, H, W), about [0, 1],
        differentiable with respect to the latents."""

    def describe(self) -> dict[str, Any]:
        """Provenance recorded beside every result."""
        return {
            "target": self.entry.name,
            "display_name": self.entry.display_name,
            "weights": self.entry.weights,
            "latent_channels": self.latent_channels,
            "compression": self.compression,
        }

    @torch.no_grad()
    def encode(self, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """(N, H, W, 3) uint8 -> latents (N, rows * cols, C) float32, positions row-major (the
        token layout of `latent_geometry`)."""
        self.latent_geometry(images.shape[1:3])
        out = []
        for s in tqdm(range(0, len(images), batch_size), desc=f"encode {self.entry.name}",
                      unit="batch", mininterval=5):
            x = torch.from_numpy(images[s : s + batch_size]).permute(0, 3, 1, 2).float() / 255.0
            z = self.encode_batch(x)
            out.append(z.flatten(2).transpose(1, 2).float().numpy())
        return np.concatenate(out)

    def decode_tokens(self, tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """Latent tokens (B, rows * cols, C) -> images (B, 3, H, W)."""
        return self.decode(tokens.transpose(1, 2).reshape(len(tokens), -1, rows, cols))

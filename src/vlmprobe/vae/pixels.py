"""`pixels32`: an identity "VAE" with the LTX-Video latent geometry.

Each latent position holds its 32x32 RGB patch (3 * 32 * 32 channels, channel-major) in the
[-1, 1] range LTX-Video encodes from; decoding puts the patches back. Nothing is learned, so
alignment with it and reconstruction through it measure how much spatial detail a model's
tokens hold, with no network in the way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlmprobe.vae.base import VideoVAE
from vlmprobe.vae.registry import VaeEntry


class PixelPatchVAE(VideoVAE):
    def __init__(self, entry: VaeEntry):
        super().__init__(entry)
        self.compression = int(entry.options["patch_px"])
        self.latent_channels = 3 * self.compression**2

    def encode_batch(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images * 2.0 - 1.0, self.compression)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (F.pixel_shuffle(latents, self.compression) + 1.0) / 2.0

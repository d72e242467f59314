"""LTX-Video's causal video VAE (diffusers `AutoencoderKLLTXVideo`) as a target.

Images go in as single frames: 5-D input (B, 3, T=1, H, W) in [-1, 1] (a single frame is a
valid 1 + 8k clip). Latents are the posterior mode (deterministic), normalised per channel as
the LTX pipelines do, (z - latents_mean) * scaling_factor / latents_std. A timestep-conditioned
decoder (LTX-Video 0.9.1 on) decodes at `decode_timestep`; the pipelines' decode-noise injection
is left out so reconstructions are deterministic.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from vlmprobe.entries import safetensors_kwargs
from vlmprobe.vae.base import VideoVAE
from vlmprobe.vae.registry import VaeEntry, VaeError


class LtxVideoVAE(VideoVAE):
    def __init__(self, entry: VaeEntry):
        super().__init__(entry)
        from diffusers import AutoencoderKLLTXVideo

        weights = entry.weights
        if weights["source"] == "random":
            # Seeded random init: for tests and offline plumbing checks only.
            with torch.random.fork_rng():
                torch.manual_seed(int(weights.get("seed", 0)))
                self.model = AutoencoderKLLTXVideo(**entry.options["config"])
        else:
            self.model = self._from_pretrained(AutoencoderKLLTXVideo, entry)
        self.model.eval().requires_grad_(False)
        self.compression = int(self.model.spatial_compression_ratio)
        self.latent_channels = int(self.model.config.latent_channels)
        self.decode_timestep = float(entry.options.get("decode_timestep", 0.05))

    @staticmethod
    def _from_pretrained(cls: Any, entry: VaeEntry) -> Any:
        weights = entry.weights
        source = weights.get("path") or weights["repo"]
        kwargs = {} if weights.get("path") else {
            "subfolder": weights.get("subfolder", "vae"),
            "revision": weights["revision"],
            "local_files_only": os.environ.get("HF_HUB_OFFLINE") == "1",
        }
        try:
            return cls.from_pretrained(source, **kwargs, **safetensors_kwargs(entry))
        except (OSError, ValueError) as e:
            raise VaeError(
                f"could not load the LTX-Video VAE from {source} {kwargs}: {e}. Only "
                f"safetensors weights load (pickled ones, such as "
                f"diffusion_pytorch_model.bin, can run code on load) unless {entry.path} sets "
                f"weights.allow_pickle_weights: true, after you have reviewed them. Fix: with "
                f"hub access, run once without HF_HUB_OFFLINE to fill the cache; offline, set "
                f"weights.path in the entry to a local copy of the `vae` folder "
                f"(config.json + diffusion_pytorch_model.safetensors)."
            ) from None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "decode_timestep": self.decode_timestep,
                "n_parameters": sum(p.numel() for p in self.model.parameters())}

    def to(self, device: torch.device) -> LtxVideoVAE:
        self.model.to(device)
        return self

    def _statistics(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Per-channel latents_mean, latents_std (shaped for (B, C, T, H, W)), scaling_factor."""
        mean = self.model.latents_mean.view(1, -1, 1, 1, 1).float()
        std = self.model.latents_std.view(1, -1, 1, 1, 1).float()
        return mean, std, float(self.model.config.scaling_factor)

    def encode_batch(self, images: torch.Tensor) -> torch.Tensor:
        frames = (images * 2.0 - 1.0).unsqueeze(2)  # (B, 3, 1, H, W)
        z = self.model.encode(frames).latent_dist.mode()
        mean, std, scale = self._statistics()
        return ((z - mean) * scale / std)[:, :, 0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std, scale = self._statistics()
        z = latents.unsqueeze(2) * std / scale + mean
        timestep = None
        if self.model.config.timestep_conditioning:
            timestep = torch.full((len(z),), self.decode_timestep, dtype=z.dtype, device=z.device)
        frames = self.model.decode(z, temb=timestep).sample  # (B, 3, 1, H, W) in about [-1, 1]
        return (frames[:, :, 0] + 1.0) / 2.0

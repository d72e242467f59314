"""Video-VAE targets: the registry's refusals, pixels32's identity, LTX-Video's conventions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlmprobe.vae.registry import VaeError, entries, get_entry, load_vae


def images(n: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_registry_lists_the_three_targets_and_refuses_unknown_names():
    assert {"pixels32", "ltx_video_tiny", "ltx_video"} <= set(entries())
    with pytest.raises(VaeError, match=r"unknown video_vae 'nope'.*pixels32.*-S video_vae="):
        get_entry("nope")


def test_real_ltx_video_refuses_without_a_pinned_revision_naming_what_to_supply():
    with pytest.raises(VaeError, match=r"weights\.revision.*40-hex.*weights\.path"):
        load_vae("ltx_video")


def test_pixels32_is_an_identity_on_the_ltx_latent_grid():
    vae = load_vae("pixels32")
    batch = images(2, 224)
    latents = vae.encode(batch)
    assert latents.shape == (2, 49, 3 * 32 * 32) and latents.min() >= -1 and latents.max() <= 1
    grid = vae.latent_geometry((224, 224)).grids[0]
    assert (grid.rows, grid.cols) == (7, 7)
    decoded = vae.decode_tokens(torch.from_numpy(latents), 7, 7)
    assert np.abs(decoded.permute(0, 2, 3, 1).numpy() * 255 - batch).max() < 1e-3
    # Latent position (r, c) holds exactly that 32x32 patch.
    patch = (batch[1, 64:96, 32:64].astype(np.float32) / 255 * 2 - 1).transpose(2, 0, 1)
    assert np.allclose(latents[1, 2 * 7 + 1], patch.reshape(-1), atol=1e-6)
    assert vae.describe()["target"] == "pixels32"


def test_image_sides_must_be_multiples_of_the_compression():
    with pytest.raises(VaeError, match="divisible by 32"):
        load_vae("pixels32").latent_geometry((224, 200))


def test_ltx_tiny_encodes_single_frames_normalised_per_channel_and_decodes_conditioned():
    vae = load_vae("ltx_video_tiny")
    batch = images(2, 64)
    raw = vae.encode(batch)
    assert raw.shape == (2, 4, 8) and vae.compression == 32
    mean, std = torch.linspace(-1, 1, 8), torch.linspace(0.5, 2, 8)
    vae.model.latents_mean.copy_(mean)
    vae.model.latents_std.copy_(std)
    normalised = vae.encode(batch)
    assert np.allclose(normalised, (raw - mean.numpy()) / std.numpy(), atol=1e-5)
    tokens = torch.from_numpy(normalised)
    out = vae.decode_tokens(tokens, 2, 2)
    assert out.shape == (2, 3, 64, 64)
    vae.decode_timestep = 0.5
    assert not torch.allclose(out, vae.decode_tokens(tokens, 2, 2))  # timestep-conditioned
    assert vae.describe()["decode_timestep"] == 0.5

"""Safetensors only: a checkpoint folder holding only pickled weights (which can run code on
load) is refused by every pretrained loader, naming the opt-in; with the opt-in it loads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from test_models_vlm import CPU
from vlmprobe.models.base import WeightsUnavailable
from vlmprobe.models.registry import adapter_for, get_entry
from vlmprobe.vae.ltx import LtxVideoVAE
from vlmprobe.vae.registry import VaeError
from vlmprobe.vae.registry import entries as vae_entries

OPT_IN = "weights.allow_pickle_weights: true"


def pickle_only(model: torch.nn.Module, folder: Path, safetensors: str, pickled: str) -> None:
    """`folder` with the model's config and its weights as a pickle only."""
    model.save_pretrained(folder)
    (folder / safetensors).unlink()
    torch.save(model.state_dict(), folder / pickled)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), key


def test_dinov2_refuses_pickled_weights_without_the_opt_in(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, image_size=28, patch_size=14))
    pickle_only(model, tmp_path, "model.safetensors", "pytorch_model.bin")
    entry = dataclasses.replace(get_entry("dinov2_small"),
                                weights={"source": "local", "path": str(tmp_path)})
    with pytest.raises(WeightsUnavailable, match=OPT_IN) as refusal:
        adapter_for(entry).load(tmp_path, CPU)
    assert "model.safetensors" in str(refusal.value)
    opted_in = dataclasses.replace(entry, weights={**entry.weights, "allow_pickle_weights": True})
    assert_same_weights(model, adapter_for(opted_in).load(tmp_path, CPU))


def test_ltx_vae_refuses_pickled_weights_without_the_opt_in(tmp_path):
    from diffusers import AutoencoderKLLTXVideo

    tiny = vae_entries()["ltx_video_tiny"]
    torch.manual_seed(0)
    model = AutoencoderKLLTXVideo(**tiny.options["config"])
    pickle_only(model, tmp_path, "diffusion_pytorch_model.safetensors",
                "diffusion_pytorch_model.bin")
    local = dataclasses.replace(vae_entries()["ltx_video"],
                                weights={"source": "hub", "path": str(tmp_path)})
    with pytest.raises(VaeError, match=OPT_IN) as refusal:
        LtxVideoVAE(local)
    assert "diffusion_pytorch_model.safetensors" in str(refusal.value)
    opted_in = dataclasses.replace(local, weights={**local.weights, "allow_pickle_weights": True})
    assert_same_weights(model, LtxVideoVAE(opted_in).model)

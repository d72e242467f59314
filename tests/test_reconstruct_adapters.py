"""Adapters: parameter budgets, shapes, locality, and a deterministic tiny training run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.reconstruct.adapters import ADAPTERS, build_adapter, n_parameters, subcell_weights
from vlmprobe.reconstruct.training import TrainSettings, train_adapter
from vlmprobe.vae.registry import load_vae

SOURCE = TokenGeometry.single_grid((64, 64), 4, 4)
LATENT = TokenGeometry.single_grid((64, 64), 2, 2)


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
@pytest.mark.parametrize("budget", [50_000, 200_000])
def test_adapters_fill_their_parameter_budget_and_map_tokens_to_latents(kind, budget):
    adapter = build_adapter(kind, SOURCE, LATENT, 24, 12, budget)
    assert 0.8 * budget <= n_parameters(adapter) <= budget
    assert adapter(torch.randn(3, 16, 24)).shape == (3, 4, 12)


def test_subcell_weights_keep_each_cells_quarters_together():
    weights = subcell_weights(SOURCE, LATENT)  # 1 source token per sub-cell here
    assert weights.shape == (16, 16)
    # Latent cell (0, 1) covers source tokens (0, 2), (0, 3), (1, 2), (1, 3).
    assert np.flatnonzero(weights[4:8].sum(axis=0)).tolist() == [2, 3, 6, 7]


def test_mlp_adapter_is_local():
    adapter = build_adapter("mlp", SOURCE, LATENT, 24, 12, 50_000)
    tokens = torch.randn(1, 16, 24)
    changed = tokens.clone()
    changed[0, 0] += 1.0  # top-left source token: only latent position 0 may change
    delta = (adapter(changed) - adapter(tokens)).abs().sum(dim=-1)[0]
    assert delta[0] > 0 and torch.all(delta[1:] == 0)


def test_training_is_deterministic_and_learns_pixels(tmp_path: Path):
    vae = load_vae("pixels32")
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
              for s, n in [("train", 16), ("val", 4), ("test", 4)]}
    # Tokens: each 16-px cell's mean colour, so the adapter can learn coarse layout.
    tokens = {s: v.reshape(len(v), 4, 16, 4, 16, 3).mean(axis=(2, 4)).reshape(len(v), 16, 3)
              .astype(np.float32) for s, v in images.items()}
    settings = TrainSettings("mlp", 60_000, warmup_epochs=3, epochs=0, train_samples=16,
                             batch_size=8, lr=1e-3, l2_weight=0.1, threads=1, seed=0)
    runs = [train_adapter(tokens, images, SOURCE, vae, None, settings, tmp_path / str(i), "x")
            for i in range(2)]
    first, second = (trained.reconstruct(tokens["test"]) for trained, _ in runs)
    assert np.array_equal(first, second) and first.shape == (4, 64, 64, 3)
    assert runs[0][1]["steps"] == 6
    assert (tmp_path / "0" / "x").is_dir()  # dvclive curves

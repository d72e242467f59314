"""The plan's two adapters (E-P4.6), from model tokens to target latent tokens (B, P, C).

- `MLPAdapter`: the plan's MLP (Linear-GELU-Linear-GELU-Linear) applied at every latent
  position to the model tokens resampled onto that position's 2x2 sub-cells (area-weighted:
  `vlmprobe.extract.geometry.area_weights`) and concatenated, so the adapter sees where inside
  the cell content lies. Local by construction: shuffled tokens cannot be put back.
- `SpatialAdapter`: one learned query per latent position cross-attends to all model tokens
  (multi-head attention), then an MLP block and a linear map to the latent channels. Queries
  and keys carry Fourier features of their image positions (from the token geometry): raw
  tokens carry no position of their own, and the model's tokens are given position the same
  way, so a token's place, not its index, decides where it goes.

Sizes: `adapter_params` is a parameter budget; the hidden width is the largest that fits it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from vlmprobe.extract.geometry import TokenGeometry, area_weights

SUBCELLS = 2  # MLPAdapter: sub-cells per latent cell side
FOURIER_BANDS = 8
HEADS = 8


def subcell_weights(source: TokenGeometry, latent: TokenGeometry) -> np.ndarray:
    """(P * SUBCELLS^2, T) area weights onto the latent grid's sub-cells, ordered so that each
    latent position's sub-cells are consecutive (row-major inside the cell)."""
    grid = latent.grids[0]
    fine = TokenGeometry.single_grid(latent.image_size, grid.rows * SUBCELLS,
                                     grid.cols * SUBCELLS)
    weights = area_weights(source, fine).reshape(grid.rows, SUBCELLS, grid.cols, SUBCELLS, -1)
    return weights.transpose(0, 2, 1, 3, 4).reshape(grid.n_tokens * SUBCELLS**2, -1)


def fourier_features(geometry: TokenGeometry) -> torch.Tensor:
    """(T, 4 * FOURIER_BANDS) sin/cos of every token centre's x and y at octave frequencies."""
    h, w = geometry.image_size
    boxes = geometry.token_boxes()
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2 / w, (boxes[:, 1] + boxes[:, 3]) / 2 / h],
                       axis=1)
    angles = centres[:, :, None] * np.pi * 2.0 ** np.arange(FOURIER_BANDS)  # (T, 2, bands)
    return torch.from_numpy(
        np.concatenate([np.sin(angles), np.cos(angles)], axis=-1).reshape(len(boxes), -1)
    ).float()


def largest_width(count, budget: int, step: int) -> int:
    """The largest width (a multiple of `step`) whose `count(width)` fits `budget`."""
    width = step
    while count(width + step) <= budget:
        width += step
    return width


class MLPAdapter(nn.Module):
    def __init__(self, source: TokenGeometry, latent: TokenGeometry, in_dim: int,
                 latent_channels: int, budget: int):
        super().__init__()
        self.register_buffer("weights", torch.from_numpy(subcell_weights(source, latent)))
        self.positions = latent.n_tokens
        wide = in_dim * SUBCELLS**2
        hidden = largest_width(
            lambda h: wide * h + h + h * h + h + h * latent_channels + latent_channels, budget, 8)
        self.net = nn.Sequential(
            nn.Linear(wide, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, latent_channels),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, P, C)."""
        cells = torch.einsum("st,btd->bsd", self.weights, tokens)
        return self.net(cells.reshape(len(tokens), self.positions, -1))


def spatial_adapter_params(width: int, in_dim: int, positions: int, channels: int) -> int:
    fourier = 4 * FOURIER_BANDS
    return (2 * ((in_dim + fourier) * width + width)  # key and value projections
            + positions * width + fourier * width + width  # queries and their positions
            + 4 * width * width + 4 * width  # attention in/out projections
            + 2 * (2 * width * width) + 3 * width + 4 * width  # MLP block and two LayerNorms
            + width * channels + channels)  # to latent channels


class SpatialAdapter(nn.Module):
    def __init__(self, source: TokenGeometry, latent: TokenGeometry, in_dim: int,
                 latent_channels: int, budget: int):
        super().__init__()
        width = largest_width(
            lambda w: spatial_adapter_params(w, in_dim, latent.n_tokens, latent_channels),
            budget, HEADS)
        self.register_buffer("key_position", fourier_features(source))
        self.register_buffer("query_position", fourier_features(latent))
        fourier = self.key_position.shape[1]
        self.proj_k = nn.Linear(in_dim + fourier, width)
        self.proj_v = nn.Linear(in_dim + fourier, width)
        self.queries = nn.Parameter(torch.randn(latent.n_tokens, width) / math.sqrt(width))
        self.query_pos = nn.Linear(fourier, width)
        self.cross_attn = nn.MultiheadAttention(width, HEADS, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(),
                                 nn.Linear(2 * width, width))
        self.out = nn.Linear(width, latent_channels)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, P, C)."""
        keyed = torch.cat([tokens, self.key_position.expand(len(tokens), -1, -1)], dim=-1)
        q = (self.queries + self.query_pos(self.query_position)).expand(len(tokens), -1, -1)
        attended, _ = self.cross_attn(q, self.proj_k(keyed), self.proj_v(keyed),
                                      need_weights=False)
        x = self.norm1(q + attended)
        x = self.norm2(x + self.mlp(x))
        return self.out(x)


ADAPTERS = {"mlp": MLPAdapter, "spatial": SpatialAdapter}


def build_adapter(kind: str, source: TokenGeometry, latent: TokenGeometry, in_dim: int,
                  latent_channels: int, budget: int) -> nn.Module:
    return ADAPTERS[kind](source, latent, in_dim, latent_channels, budget)


def n_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

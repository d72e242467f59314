"""Model tokens resampled onto a target's latent grid by area overlap.

A latent cell (32x32 px for LTX-Video) covers parts of several model tokens (14x14 px for
DINOv2); its pooled token is their average weighted by how much of the cell each covers. Works
for any token geometry, multi-grid ones included (overlapping grids share the weight).
"""

from __future__ import annotations

import numpy as np

from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.extract.tokens import Tokens, as_tokens, chunks

POOL_ELEMENTS = 2**24  # source token values read per chunk of images (64 MiB as float32)


def area_weights(source: TokenGeometry, target: TokenGeometry) -> np.ndarray:
    """(T_target, T_source) overlap areas of every source token with every target cell, each
    row normalised to sum 1 (rows no source token covers stay 0)."""
    s, t = source.token_boxes(), target.token_boxes()
    width = np.minimum(t[:, None, 2], s[None, :, 2]) - np.maximum(t[:, None, 0], s[None, :, 0])
    height = np.minimum(t[:, None, 3], s[None, :, 3]) - np.maximum(t[:, None, 1], s[None, :, 1])
    overlap = np.clip(width, 0, None) * np.clip(height, 0, None)
    total = overlap.sum(axis=1, keepdims=True)
    return np.divide(overlap, total, out=np.zeros_like(overlap), where=total > 0).astype(
        np.float32)


def pool_tokens(tokens: Tokens | np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N, T_source, D) tokens -> (N, T_target, D) by `area_weights`; a stored point is read a
    chunk of images at a time (only the pooled tokens are held)."""
    tokens = as_tokens(tokens)
    n, t, d = tokens.shape
    out = np.empty((n, len(weights), d), dtype=np.float32)
    for index, x in chunks(tokens, max(1, POOL_ELEMENTS // (t * d))):
        out[index] = np.einsum("pt,ntd->npd", weights, x, optimize=True)
    return out

"""Model tokens resampled onto a target's latent grid by area overlap
(`vlmprobe.extract.geometry.area_weights`).

A latent cell (32x32 px for LTX-Video) covers parts of several model tokens (14x14 px for
DINOv2); its pooled token is their average weighted by how much of the cell each covers. Works
for any token geometry, multi-grid ones included (overlapping grids share the weight).
"""

from __future__ import annotations

import numpy as np

from vlmprobe.extract.tokens import Tokens, as_tokens, chunks

POOL_ELEMENTS = 2**24  # source token values read per chunk of images (64 MiB as float32)


def pool_tokens(tokens: Tokens | np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N, T_source, D) tokens -> (N, T_target, D) by `area_weights`; a stored point is read a
    chunk of images at a time (only the pooled tokens are held)."""
    tokens = as_tokens(tokens)
    n, t, d = tokens.shape
    out = np.empty((n, len(weights), d), dtype=np.float32)
    for index, x in chunks(tokens, max(1, POOL_ELEMENTS // (t * d))):
        out[index] = np.einsum("pt,ntd->npd", weights, x, optimize=True)
    return out

"""The controls every probe result stands beside.

- oracle (positive): tokens built from the ground truth itself, so the information is
  present and linearly decodable by construction; a probe that fails here is broken.
- oracle_shuffled (negative): the oracle tokens with positions permuted per image, so only
  dataset priors (typical box sizes, object counts) remain; a probe that still scores here
  reads something other than layout.
- pixels (positive for reconstruction): raw patches on the same grid, the information ceiling.
- shuffled: the model's own tokens with positions permuted per image. For local probes (bbox,
  dense, reconstruction) a negative control; for non-local ones (DETR-style, direction) a
  diagnostic: a model that writes absolute position into token content keeps it when shuffled.
"""

from __future__ import annotations

import numpy as np

from vlmprobe.extract.geometry import TokenGeometry, patchify


def oracle_tokens(
    coverage: np.ndarray, dim: int, noise: float, seed: int, stream: int
) -> np.ndarray:
    """Coverage (N, T, C) through a fixed random orthogonal map into `dim` dims, plus noise.

    The map depends on `seed` only, so every split shares it; `stream` varies the noise.
    """
    c = coverage.shape[-1]
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((dim, c)))
    tokens = coverage @ q.T
    noise_rng = np.random.default_rng([seed, stream])
    return (tokens + noise * noise_rng.standard_normal(tokens.shape)).astype(np.float32)


def shuffled_tokens(features: np.ndarray, seed: int, stream: int) -> np.ndarray:
    """Each image's tokens (N, T, D) permuted across positions, independently per image."""
    rng = np.random.default_rng([seed, stream])
    out = np.empty_like(features)
    for i in range(len(features)):
        out[i] = features[i, rng.permutation(features.shape[1])]
    return out


def pixel_tokens(images: np.ndarray, geometry: TokenGeometry, patch_px: int = 14) -> np.ndarray:
    return patchify(images, geometry, patch_px)

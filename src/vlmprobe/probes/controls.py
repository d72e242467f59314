"""The controls every probe result stands beside, built in one place with one seed rule.

- oracle (positive): tokens built from the ground truth itself, so the information is
  present and linearly decodable by construction; a probe that fails here is broken. Each
  token carries what a perfect model would give the bbox probe's linear readout
  (`vlmprobe.probes.coverage.instance_targets`): its region's coverage by each class and the
  box of the instance covering most of it.
- oracle_shuffled (negative): the oracle tokens with positions permuted per image, so only
  dataset priors (typical box sizes, object counts) remain; a probe that still scores here
  reads something other than layout.
- pixels (positive for reconstruction): raw patches on the same grid, the information ceiling.
- shuffled: the model's own tokens with positions permuted per image. For local probes (bbox,
  dense, reconstruction) a negative control; for non-local ones (DETR-style, direction) a
  diagnostic: a model that writes absolute position into token content keeps it when shuffled.

The seed rule: a control's randomness for image i of stream s (a split, a clip) comes from
the seed, s, i and what is drawn alone (`image_rng`), so any image's control tokens are built
without the others', in any order: the probes read them a batch at a time
(`vlmprobe.extract.tokens`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from vlmprobe.extract.geometry import TokenGeometry, patchify
from vlmprobe.extract.tokens import ArrayTokens, Tokens, every_row

NOISE, ORDER = 0, 1  # what a control draws: the oracle's noise, a shuffle's permutation


def image_rng(seed: int, stream: int, image: int, draw: int) -> np.random.Generator:
    """The one seed rule of every control: `draw` for image `image` of stream `stream` (the
    draws are independent, so shuffling the oracle does not reuse its noise's bits)."""
    return np.random.default_rng([seed, stream, image, draw])


@dataclass(frozen=True)
class OracleTokens:
    """Per-token targets (N, T, K) through a fixed random orthogonal map into `dim` dims, plus
    noise.

    The map depends on the seed only, so every split shares it; the noise follows the rule.
    """

    targets: np.ndarray
    dim: int
    noise: float
    seed: int
    stream: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (*self.targets.shape[:2], self.dim)

    @cached_property
    def map(self) -> np.ndarray:
        c = self.targets.shape[-1]
        return np.linalg.qr(np.random.default_rng(self.seed).standard_normal((self.dim, c)))[0]

    def rows(self, index: np.ndarray) -> np.ndarray:
        tokens = self.targets[index] @ self.map.T
        for row, i in zip(tokens, index, strict=True):
            row += self.noise * image_rng(self.seed, self.stream, int(i), NOISE).standard_normal(
                row.shape)
        return tokens.astype(np.float32)


@dataclass(frozen=True)
class ShuffledTokens:
    """`base` with each image's tokens permuted across positions, independently per image."""

    base: Tokens
    seed: int
    stream: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.base.shape

    def rows(self, index: np.ndarray) -> np.ndarray:
        tokens = self.base.rows(index)
        for row, i in zip(tokens, index, strict=True):
            row[:] = row[image_rng(self.seed, self.stream, int(i), ORDER).permutation(len(row))]
        return tokens


@dataclass(frozen=True)
class PixelTokens:
    """Raw patches of the images on the token grid, `patch_px` square each."""

    images: np.ndarray  # (N, H, W, 3) uint8
    geometry: TokenGeometry
    patch_px: int = 14

    @property
    def shape(self) -> tuple[int, int, int]:
        return (len(self.images), self.geometry.n_tokens, 3 * self.patch_px**2)

    def rows(self, index: np.ndarray) -> np.ndarray:
        return patchify(self.images[index], self.geometry, self.patch_px)


# Whole arrays, for the stages that pool every image at once (align, temporal, reconstruct).
def oracle_tokens(
    targets: np.ndarray, dim: int, noise: float, seed: int, stream: int
) -> np.ndarray:
    return every_row(OracleTokens(targets, dim, noise, seed, stream))


def shuffled_tokens(features: np.ndarray, seed: int, stream: int) -> np.ndarray:
    return every_row(ShuffledTokens(ArrayTokens(features), seed, stream))


def pixel_tokens(images: np.ndarray, geometry: TokenGeometry, patch_px: int = 14) -> np.ndarray:
    return every_row(PixelTokens(images, geometry, patch_px))

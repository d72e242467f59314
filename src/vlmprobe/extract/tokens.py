"""A split's tokens, read a batch of images at a time.

A probe never holds a split's tokens whole: at the plan's scale (LLaVA-NeXT at 448 px, 2880
tokens x 4096 dims an image) 1000 images are 23.6 GB per point in float16. Every token set the
probes read (a feature store's point, and the controls built from it or from the ground
truth) answers `rows(index)`, the float32 tokens (len(index), T, D) of those images, so memory
held beyond the probe's own is one batch.

The controls (`vlmprobe.probes.controls`) are token sets of the same kind, built lazily.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Tokens(Protocol):
    """(N, T, D) tokens, read by image."""

    @property
    def shape(self) -> tuple[int, int, int]: ...

    def rows(self, index: np.ndarray) -> np.ndarray:
        """float32 (len(index), T, D): the tokens of images `index`, in that order."""
        ...


def as_tokens(tokens: Tokens | np.ndarray) -> Tokens:
    return ArrayTokens(tokens) if isinstance(tokens, np.ndarray) else tokens


def chunks(tokens: Tokens, images: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(image indices, their tokens) over all images in order, `images` at a time."""
    n = tokens.shape[0]
    for start in range(0, n, images):
        index = np.arange(start, min(start + images, n))
        yield index, tokens.rows(index)


def every_row(tokens: Tokens) -> np.ndarray:
    """All of `tokens` at once, for the stages that pool every image (align, temporal)."""
    return tokens.rows(np.arange(tokens.shape[0]))


@dataclass(frozen=True)
class ArrayTokens:
    """Tokens already in memory (a test's, or a stage that computes them)."""

    array: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    def rows(self, index: np.ndarray) -> np.ndarray:
        return np.asarray(self.array[index], dtype=np.float32)

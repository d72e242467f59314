"""The alignment study (E-P4.5): one representation against the target's latents.

Representations, as each metric needs them (n images, P latent positions):
- CKA (linear and RBF, biased and debiased), distance Spearman, recall@10: each image is one
  vector, its tokens pooled onto the latent grid (`pooling`) and flattened position by
  position (P x D); the target's latents flattened the same way (P x C). Flattening keeps the
  layout: two images with the same content in different places differ.
- R^2: one ridge map from a pooled token (D) to the latent at the same position (C), shared
  across positions, fit on train, penalty chosen on val, scored on test (variance-weighted).
- Minibatch CKA: linear, unbiased HSIC summed over seeded batches of images (memory-bounded
  estimator; here its batches' Grams are blocks of the full ones).
Intervals: half-sampling for the pairwise metrics, bootstrap over images for recall@10 (per-image
overlaps on the full set) and for R^2 (per-image errors on test); see `intervals`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlmprobe.align.intervals import bootstrap_mean_ci, half_sample_ci
from vlmprobe.align.metrics import (
    batch_indices,
    cka_from_grams,
    distance_spearman,
    knn_recall,
    linear_gram,
    minibatch_cka,
    rbf_gram,
    ridge_r2,
    squared_distances,
)
from vlmprobe.metrics.boxes import bootstrap_ci

SPLIT_NAMES = ("train", "val", "test")
KNN_K = 10  # the plan's neighbourhood overlap: recall@10


@dataclass(frozen=True)
class AlignSettings:
    rbf_sigma: float
    ridge_alphas: list[float]
    minibatch_size: int
    interval_rounds: int
    seed: int


@dataclass(frozen=True)
class Kernels:
    """One representation's image-by-image matrices, computed once and shared by metrics."""

    linear: np.ndarray
    squared_distances: np.ndarray
    rbf: np.ndarray

    @classmethod
    def of(cls, flat: np.ndarray, rbf_sigma: float) -> Kernels:
        gram = linear_gram(flat)
        d2 = squared_distances(gram)
        return cls(gram, d2, rbf_gram(d2, rbf_sigma))


def _sub(matrix: np.ndarray, index: np.ndarray) -> np.ndarray:
    return matrix[np.ix_(index, index)]


def cka_scores(x: Kernels, y: Kernels, settings: AlignSettings) -> dict:
    """The four CKA variants, each with its half-sampling interval."""
    out = {}
    variants = {
        "cka_linear": ("linear", True),
        "cka_linear_biased": ("linear", False),
        "cka_rbf": ("rbf", True),
        "cka_rbf_biased": ("rbf", False),
    }
    n = len(x.linear)
    for i, (name, (kernel, debiased)) in enumerate(variants.items()):
        kx, ky = getattr(x, kernel), getattr(y, kernel)

        def statistic(index, kx=kx, ky=ky, debiased=debiased):
            return cka_from_grams(_sub(kx, index), _sub(ky, index), debiased)

        out[name] = statistic(np.arange(n))
        out[f"{name}_ci95"] = list(
            half_sample_ci(statistic, n, settings.interval_rounds, settings.seed + i))
    return out


def alignment_scores(
    tokens: np.ndarray,
    target: np.ndarray,
    target_kernels: Kernels,
    group_grams: list[np.ndarray],
    split_of: dict[str, np.ndarray],
    settings: AlignSettings,
) -> tuple[dict, list[float]]:
    """All metrics for one representation, and its debiased linear CKA with each channel
    group of the target (`channel_group_grams`; the CKA heatmap's row).

    tokens: (n, P, D) pooled onto the latent grid; target: (n, P, C) latents; split_of: the
    row indices of each split (R^2 only; the other metrics use every image).
    """
    n = len(tokens)
    flat = tokens.reshape(n, -1)
    kernels = Kernels.of(flat, settings.rbf_sigma)
    scores = cka_scores(kernels, target_kernels, settings)
    # Blocks of the full Grams are exactly the batches' Grams; no need to recompute them.
    scores["cka_minibatch"] = minibatch_cka(
        (_sub(kernels.linear, b), _sub(target_kernels.linear, b))
        for b in batch_indices(n, settings.minibatch_size, settings.seed))

    def spearman(index):
        return distance_spearman(_sub(kernels.squared_distances, index),
                                 _sub(target_kernels.squared_distances, index))

    scores["spearman"] = spearman(np.arange(n))
    scores["spearman_ci95"] = list(
        half_sample_ci(spearman, n, settings.interval_rounds, settings.seed))

    recall = knn_recall(kernels.squared_distances, target_kernels.squared_distances, KNN_K)
    scores["recall_at_10"] = float(recall.mean())
    scores["recall_at_10_ci95"] = list(
        bootstrap_mean_ci(recall, settings.interval_rounds, settings.seed))

    scores.update(r2_scores(tokens, target, split_of, settings))
    by_group = [cka_from_grams(kernels.linear, g, debiased=True) for g in group_grams]
    return scores, by_group


def r2_scores(tokens: np.ndarray, target: np.ndarray, split_of: dict[str, np.ndarray],
              settings: AlignSettings) -> dict:
    """Per-position ridge R^2 on test, with a bootstrap interval over test images."""
    d, c = tokens.shape[-1], target.shape[-1]
    x = {s: tokens[split_of[s]].reshape(-1, d) for s in SPLIT_NAMES}
    y = {s: target[split_of[s]].reshape(-1, c) for s in SPLIT_NAMES}
    r2, alpha, prediction = ridge_r2(x, y, settings.ridge_alphas)
    n_test = len(split_of["test"])
    y_test = y["test"].astype(np.float64)
    errors = ((y_test - prediction) ** 2).reshape(n_test, -1).sum(axis=1)
    spread = ((y_test - y_test.mean(axis=0)) ** 2).reshape(n_test, -1).sum(axis=1)
    lo, hi = bootstrap_ci(errors, spread, settings.interval_rounds, settings.seed)
    return {"r2": r2, "r2_ci95": [1.0 - hi, 1.0 - lo], "r2_alpha": alpha}


def channel_groups(n_channels: int, groups: int) -> list[np.ndarray]:
    """`groups` contiguous, near-equal groups of latent channel indices."""
    return np.array_split(np.arange(n_channels), groups)


def channel_group_grams(target: np.ndarray, groups: int) -> list[np.ndarray]:
    """Linear Gram matrices of the target restricted to each channel group (flattened over
    positions)."""
    n = len(target)
    return [linear_gram(target[:, :, g].reshape(n, -1))
            for g in channel_groups(target.shape[-1], groups)]

"""Closed-form ridge regression over token features, solved once for a grid of penalties."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LinearMap:
    weight: np.ndarray  # (D, C)
    bias: np.ndarray  # (C,)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight + self.bias


Pairs = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def fit_ridge_path(
    x: np.ndarray, y: np.ndarray, alphas: list[float], chunk: int = 65536
) -> dict[float, LinearMap]:
    """Ridge fits of y (n, C) on x (n, D) held in memory (see `fit_ridge_stream`)."""
    return fit_ridge_stream(
        lambda: ((x[s : s + chunk], y[s : s + chunk]) for s in range(0, len(x), chunk)), alphas)


def fit_ridge_stream(pairs: Pairs, alphas: list[float]) -> dict[float, LinearMap]:
    """Ridge fits of y on x for every relative penalty in `alphas`; `pairs()` yields the rows
    as (x (n, D), y (n, C)) chunks, and is read twice (the means, then the normal equations).

    Penalties are relative to the mean feature variance (alpha * trace(Cov) / D), so one grid
    suits features of any scale. Statistics are accumulated in float64 over the chunks, so
    memory stays at O(D^2) beyond one chunk. One eigendecomposition serves every alpha.
    """
    n, x_sum, y_sum = 0, 0.0, 0.0
    for xs, ys in pairs():
        n += len(xs)
        x_sum = x_sum + xs.sum(axis=0, dtype=np.float64)
        y_sum = y_sum + ys.sum(axis=0, dtype=np.float64)
    x_mean, y_mean = x_sum / n, y_sum / n
    d, c = len(x_mean), len(y_mean)
    gram = np.zeros((d, d))
    cross = np.zeros((d, c))
    for xs, ys in pairs():
        xc = xs.astype(np.float64) - x_mean
        gram += xc.T @ xc
        cross += xc.T @ (ys.astype(np.float64) - y_mean)
    eigvals, eigvecs = np.linalg.eigh(gram)
    eigvals = np.clip(eigvals, 0.0, None)
    projected = eigvecs.T @ cross
    scale = max(float(eigvals.sum()) / d, 1e-12)
    fits = {}
    for alpha in alphas:
        weight = eigvecs @ (projected / (eigvals + alpha * scale)[:, None])
        fits[alpha] = LinearMap(weight, y_mean - x_mean @ weight)
    return fits

"""Closed-form ridge regression over token features, solved once for a grid of penalties."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LinearMap:
    weight: np.ndarray  # (D, C)
    bias: np.ndarray  # (C,)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight + self.bias


def fit_ridge_path(
    x: np.ndarray, y: np.ndarray, alphas: list[float], chunk: int = 65536
) -> dict[float, LinearMap]:
    """Ridge fits of y (n, C) on x (n, D) for every relative penalty in `alphas`.

    Penalties are relative to the mean feature variance (alpha * trace(Cov) / D), so one grid
    suits features of any scale. Statistics are accumulated in float64 over row chunks, so
    memory stays at O(D^2) beyond the inputs. One eigendecomposition serves every alpha.
    """
    n, d = x.shape
    x_mean = np.zeros(d)
    y_mean = y.mean(axis=0, dtype=np.float64)
    for s in range(0, n, chunk):
        x_mean += x[s : s + chunk].sum(axis=0, dtype=np.float64)
    x_mean /= n
    gram = np.zeros((d, d))
    cross = np.zeros((d, y.shape[1]))
    for s in range(0, n, chunk):
        xc = x[s : s + chunk].astype(np.float64) - x_mean
        gram += xc.T @ xc
        cross += xc.T @ (y[s : s + chunk].astype(np.float64) - y_mean)
    eigvals, eigvecs = np.linalg.eigh(gram)
    eigvals = np.clip(eigvals, 0.0, None)
    projected = eigvecs.T @ cross
    scale = max(float(eigvals.sum()) / d, 1e-12)
    fits = {}
    for alpha in alphas:
        weight = eigvecs @ (projected / (eigvals + alpha * scale)[:, None])
        fits[alpha] = LinearMap(weight, y_mean - x_mean @ weight)
    return fits

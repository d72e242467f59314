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
    (fits,) = fit_ridge_streams(lambda: (((x, y),) for x, y in pairs()), alphas)
    return fits


def fit_ridge_streams(problems: Callable[[], Iterable[tuple[tuple[np.ndarray, np.ndarray], ...]]],
                      alphas: list[float]) -> list[dict[float, LinearMap]]:
    """Several ridge problems (as `fit_ridge_stream`) fit from one stream: `problems()` yields,
    per chunk, one (x, y) pair per problem, so inputs the problems share are read twice in all,
    not twice per problem."""
    n: list[int] = []
    x_sum: list[np.ndarray] = []
    y_sum: list[np.ndarray] = []
    for chunk in problems():
        for k, (xs, ys) in enumerate(chunk):
            if k == len(n):
                n.append(0)
                x_sum.append(np.zeros(xs.shape[1]))
                y_sum.append(np.zeros(ys.shape[1]))
            n[k] += len(xs)
            x_sum[k] = x_sum[k] + xs.sum(axis=0, dtype=np.float64)
            y_sum[k] = y_sum[k] + ys.sum(axis=0, dtype=np.float64)
    x_mean = [total / count for total, count in zip(x_sum, n, strict=True)]
    y_mean = [total / count for total, count in zip(y_sum, n, strict=True)]
    gram = [np.zeros((len(m), len(m))) for m in x_mean]
    cross = [np.zeros((len(mx), len(my))) for mx, my in zip(x_mean, y_mean, strict=True)]
    for chunk in problems():
        for k, (xs, ys) in enumerate(chunk):
            xc = xs.astype(np.float64) - x_mean[k]
            gram[k] += xc.T @ xc
            cross[k] += xc.T @ (ys.astype(np.float64) - y_mean[k])
    return [_solve(*stats, alphas) for stats in zip(gram, cross, x_mean, y_mean, strict=True)]


def _solve(gram: np.ndarray, cross: np.ndarray, x_mean: np.ndarray, y_mean: np.ndarray,
           alphas: list[float]) -> dict[float, LinearMap]:
    eigvals, eigvecs = np.linalg.eigh(gram)
    eigvals = np.clip(eigvals, 0.0, None)
    projected = eigvecs.T @ cross
    scale = max(float(eigvals.sum()) / len(x_mean), 1e-12)
    fits = {}
    for alpha in alphas:
        weight = eigvecs @ (projected / (eigvals + alpha * scale)[:, None])
        fits[alpha] = LinearMap(weight, y_mean - x_mean @ weight)
    return fits

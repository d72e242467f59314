"""Closed-form ridge regression over token features, solved once for a grid of penalties."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class LinearMap:
    weight: np.ndarray  # (D, C)
    bias: np.ndarray  # (C,)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight + self.bias


Pairs = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
HOST = torch.device("cpu")


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
                      alphas: list[float], device: torch.device = HOST
                      ) -> list[dict[float, LinearMap]]:
    """Several ridge problems (as `fit_ridge_stream`) fit from one stream: `problems()` yields,
    per chunk, one (x, y) pair per problem, so inputs the problems share are read twice in all,
    not twice per problem. On a GPU `device` the normal equations (the cost: rows x D^2) are
    accumulated there, still in float64; the solve stays on the host."""
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
    gram: list = [0.0] * len(n)
    cross: list = [0.0] * len(n)
    for chunk in problems():
        for k, (xs, ys) in enumerate(chunk):
            g, c = _normal_equations(xs, ys, x_mean[k], y_mean[k], device)
            gram[k], cross[k] = gram[k] + g, cross[k] + c
    return [_solve(_host(g), _host(c), mx, my, alphas)
            for g, c, mx, my in zip(gram, cross, x_mean, y_mean, strict=True)]


def _normal_equations(xs: np.ndarray, ys: np.ndarray, x_mean: np.ndarray, y_mean: np.ndarray,
                      device: torch.device):
    """One chunk's centred X^T X and X^T Y in float64, computed on `device`."""
    if device.type == "cpu":
        xc = xs.astype(np.float64) - x_mean
        return xc.T @ xc, xc.T @ (ys.astype(np.float64) - y_mean)
    xc = torch.as_tensor(xs, device=device).double() - torch.as_tensor(x_mean, device=device)
    yc = torch.as_tensor(ys, device=device).double() - torch.as_tensor(y_mean, device=device)
    return xc.T @ xc, xc.T @ yc


def _host(total) -> np.ndarray:
    return total.cpu().numpy() if isinstance(total, torch.Tensor) else np.asarray(total)


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

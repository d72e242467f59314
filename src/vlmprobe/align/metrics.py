"""Representation-alignment metrics: pure functions on (n, d) arrays, one row per image.

CKA follows Kornblith et al. (2019), "Similarity of Neural Network Representations Revisited":
CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) on Gram matrices K, L. HSIC is estimated
either with the biased estimator tr(KHLH) / (n-1)^2 (H the centring matrix) or with the
unbiased U-statistic of Song et al. (2012), whose expectation does not depend on n; the biased
one overstates the similarity of high-dimensional representations of few samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
from scipy.stats import rankdata

from vlmprobe.metrics.finite import require_finite
from vlmprobe.probes.ridge import fit_ridge_path


def _as64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1)


def linear_gram(x: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """X X' in float64, accumulated over column chunks so wide float32 inputs are never
    copied whole to float64."""
    # Every feature matrix of the CKA variants enters here: checked once, where it enters.
    require_finite("linear_gram(x)", x)
    x = np.asarray(x).reshape(len(x), -1)
    gram = np.zeros((len(x), len(x)))
    for s in range(0, x.shape[1], chunk):
        block = x[:, s : s + chunk].astype(np.float64)
        gram += block @ block.T
    return gram


def squared_distances(gram: np.ndarray) -> np.ndarray:
    """(n, n) squared Euclidean distances between rows from their Gram matrix (clipped at 0
    against round-off)."""
    require_finite("squared_distances(gram)", gram)
    norms = np.diag(gram)
    return np.clip(norms[:, None] + norms[None, :] - 2.0 * gram, 0.0, None)


def rbf_gram(d2: np.ndarray, sigma_frac: float) -> np.ndarray:
    """Gaussian kernel on squared distances `d2`, bandwidth sigma_frac * sqrt(median d2).

    The bandwidth follows the data's scale, so RBF CKA, like linear CKA, is invariant to
    isotropic scaling (Kornblith et al. take the median over all n^2 entries; so do we).
    """
    require_finite("rbf_gram(d2)", d2)
    median = float(np.median(d2))
    if median <= 0:
        return np.ones_like(d2)
    return np.exp(-d2 / (2.0 * sigma_frac**2 * median))


def hsic_biased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741 (the paper's name)
    """tr(K H L H) / (n - 1)^2, computed by centring K's rows and columns."""
    require_finite("hsic_biased(k)", k)
    require_finite("hsic_biased(l)", l)
    n = len(k)
    kc = k - k.mean(axis=0, keepdims=True)
    kc = kc - kc.mean(axis=1, keepdims=True)
    return float(np.sum(kc * l) / (n - 1) ** 2)


def hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """Song et al.'s unbiased HSIC estimator; needs n >= 4.

    With K~, L~ the Gram matrices with zeroed diagonals:
    [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)).
    """
    n = len(k)
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 samples, got {n}")
    require_finite("hsic_unbiased(k)", k)
    require_finite("hsic_unbiased(l)", l)
    k = k.copy()
    l = l.copy()  # noqa: E741
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    k_rows, l_rows = k.sum(axis=1), l.sum(axis=1)
    term = np.sum(k * l) + k_rows.sum() * l_rows.sum() / ((n - 1) * (n - 2))
    term -= 2.0 / (n - 2) * float(k_rows @ l_rows)
    return float(term / (n * (n - 3)))


def cka_from_grams(k: np.ndarray, l: np.ndarray, debiased: bool) -> float:  # noqa: E741
    hsic = hsic_unbiased if debiased else hsic_biased
    denominator = np.sqrt(max(hsic(k, k), 0.0) * max(hsic(l, l), 0.0))
    return float(hsic(k, l) / denominator) if denominator > 0 else 0.0


def linear_cka(x: np.ndarray, y: np.ndarray, debiased: bool = True) -> float:
    return cka_from_grams(linear_gram(x), linear_gram(y), debiased)


def rbf_cka(x: np.ndarray, y: np.ndarray, sigma_frac: float = 1.0, debiased: bool = True) -> float:
    kx = rbf_gram(squared_distances(linear_gram(x)), sigma_frac)
    ky = rbf_gram(squared_distances(linear_gram(y)), sigma_frac)
    return cka_from_grams(kx, ky, debiased)


def minibatch_cka(gram_batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> float:
    """CKA from unbiased HSIC summed over minibatches (Nguyen et al., 2021), given each
    batch's pair of Gram matrices (from `linear_gram` of a batch of features, or blocks of
    full Grams already at hand).

    Each batch's unbiased HSIC is an unbiased estimate of the population HSIC, so their sums
    converge to it while memory stays at one batch's Gram matrices; the ratio (CKA) keeps the
    small bias of a ratio of estimates. Batches need at least 4 images each.
    """
    xy = xx = yy = 0.0
    for k, l in gram_batches:  # noqa: E741
        xy += hsic_unbiased(k, l)
        xx += hsic_unbiased(k, k)
        yy += hsic_unbiased(l, l)
    denominator = np.sqrt(max(xx, 0.0) * max(yy, 0.0))
    return float(xy / denominator) if denominator > 0 else 0.0


def batch_indices(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Seeded random batches of range(n); a remainder under 4 images is dropped."""
    order = np.random.default_rng(seed).permutation(n)
    for s in range(0, n, batch_size):
        if len(order[s : s + batch_size]) >= 4:
            yield order[s : s + batch_size]


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Variance-weighted R^2: 1 - total squared error / total variance about y_true's mean."""
    require_finite("r2_score(y_true)", y_true)
    require_finite("r2_score(y_pred)", y_pred)
    y_true, y_pred = _as64(y_true), _as64(y_pred)
    total = np.sum((y_true - y_true.mean(axis=0)) ** 2)
    return float(1.0 - np.sum((y_true - y_pred) ** 2) / total) if total > 0 else 0.0


def ridge_r2(
    x: dict[str, np.ndarray], y: dict[str, np.ndarray], alphas: list[float]
) -> tuple[float, float, np.ndarray]:
    """Ridge map x -> y fit on `train`, its penalty chosen by val R^2, scored on `test`.

    Returns (test R^2, chosen alpha, test predictions).
    """
    for split in ("train", "val", "test"):  # a NaN in train would make every fit NaN
        require_finite(f"ridge_r2(x[{split!r}])", x[split])
        require_finite(f"ridge_r2(y[{split!r}])", y[split])
    fits = fit_ridge_path(x["train"], y["train"], alphas)
    alpha = max(alphas, key=lambda a: r2_score(y["val"], fits[a](x["val"])))
    prediction = fits[alpha](x["test"])
    return r2_score(y["test"], prediction), alpha, prediction


def upper_triangle(matrix: np.ndarray) -> np.ndarray:
    return matrix[np.triu_indices(len(matrix), k=1)]


def distance_spearman(dx2: np.ndarray, dy2: np.ndarray) -> float:
    """Spearman rho between two representations' pairwise distances, given as (n, n) squared
    distance matrices (each unordered pair once; ties get their average rank; squaring keeps
    the ranks)."""
    require_finite("distance_spearman(dx2)", dx2)  # rankdata ranks NaN as the largest
    require_finite("distance_spearman(dy2)", dy2)
    rx, ry = rankdata(upper_triangle(dx2)), rankdata(upper_triangle(dy2))
    return float(np.corrcoef(rx, ry)[0, 1])


def knn_indices(d2: np.ndarray, k: int) -> np.ndarray:
    """(n, k) indices of each row's k nearest other rows by the (n, n) distances `d2`
    (ties go to the lower index)."""
    require_finite("knn_indices(d2)", d2)  # argsort puts NaN last: it would look far away
    d2 = d2.astype(np.float64, copy=True)
    np.fill_diagonal(d2, np.inf)
    return np.argsort(d2, axis=1, kind="stable")[:, :k]


def knn_recall(dx2: np.ndarray, dy2: np.ndarray, k: int = 10) -> np.ndarray:
    """Per image: the fraction of its k nearest neighbours under distances dx2 that are also
    among its k nearest under dy2 (mutual k-NN overlap; their mean is recall@k)."""
    nx, ny = knn_indices(dx2, k), knn_indices(dy2, k)
    return np.array([len(np.intersect1d(a, b)) / k for a, b in zip(nx, ny, strict=True)])

"""Alignment metrics against direct implementations of their textbook definitions."""

from __future__ import annotations

from itertools import permutations

import numpy as np
import pytest

from vlmprobe.align.metrics import (
    batch_indices,
    cka_from_grams,
    distance_spearman,
    hsic_biased,
    hsic_unbiased,
    knn_recall,
    linear_cka,
    linear_gram,
    minibatch_cka,
    r2_score,
    rbf_cka,
    ridge_r2,
    squared_distances,
)


def related(n: int, dx: int, dy: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dx))
    y = np.tanh(x @ rng.standard_normal((dx, dy))) + noise * rng.standard_normal((n, dy))
    return x, y


def reference_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al., eq. (CKA with the linear kernel in feature space)."""
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    return np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def reference_hsic_biased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    n = len(k)
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2


def reference_hsic_unbiased(k: np.ndarray, l: np.ndarray) -> float:  # noqa: E741
    """The U-statistic over distinct index tuples (Song et al. 2012), summed term by term."""
    n = len(k)
    pairs = sum(k[i, j] * l[i, j] for i, j in permutations(range(n), 2))
    triples = sum(k[i, j] * l[i, q] for i, j, q in permutations(range(n), 3))
    quads = sum(k[i, j] * l[q, r] for i, j, q, r in permutations(range(n), 4))
    return (pairs / (n * (n - 1)) + quads / (n * (n - 1) * (n - 2) * (n - 3))
            - 2 * triples / (n * (n - 1) * (n - 2)))


def reference_rbf(x: np.ndarray, sigma_frac: float) -> np.ndarray:
    d2 = np.array([[np.sum((a - b) ** 2) for b in x] for a in x])
    return np.exp(-d2 / (2 * sigma_frac**2 * np.median(d2)))


def test_biased_linear_cka_matches_the_feature_space_formula():
    x, y = related(40, 12, 7, 0.5, seed=0)
    assert linear_cka(x, y, debiased=False) == pytest.approx(reference_linear_cka(x, y), abs=1e-6)


def test_hsic_estimators_match_their_definitions():
    x, y = related(7, 5, 3, 0.3, seed=1)
    k, l = linear_gram(x), reference_rbf(y, 0.8)  # noqa: E741
    assert hsic_biased(k, l) == pytest.approx(reference_hsic_biased(k, l), abs=1e-6)
    assert hsic_unbiased(k, l) == pytest.approx(reference_hsic_unbiased(k, l), abs=1e-6)


@pytest.mark.parametrize("debiased", [False, True])
def test_rbf_cka_matches_a_direct_kernel(debiased):
    x, y = related(30, 6, 4, 0.3, seed=2)
    kx, ky = reference_rbf(x, 0.5), reference_rbf(y, 0.5)
    # hsic_unbiased itself is checked against its definition above (n = 30 is too many for
    # the term-by-term sum).
    est = hsic_unbiased if debiased else reference_hsic_biased
    expected = est(kx, ky) / np.sqrt(est(kx, kx) * est(ky, ky))
    assert rbf_cka(x, y, 0.5, debiased) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("kind", ["linear", "rbf"])
@pytest.mark.parametrize("debiased", [False, True])
def test_cka_is_invariant_to_rotation_and_isotropic_scaling_and_one_on_itself(kind, debiased):
    x, y = related(50, 10, 8, 0.5, seed=3)
    q, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((10, 10)))
    cka = (lambda a, b: linear_cka(a, b, debiased)) if kind == "linear" else (
        lambda a, b: rbf_cka(a, b, 0.8, debiased))
    base = cka(x, y)
    assert cka(3.7 * x @ q, y) == pytest.approx(base, abs=1e-6)
    assert cka(x, 0.01 * y) == pytest.approx(base, abs=1e-6)
    assert cka(x, x) == pytest.approx(1.0, abs=1e-9)


def feature_batches(x, y, batch_size, seed):
    return ((linear_gram(x[b]), linear_gram(y[b])) for b in batch_indices(len(x), batch_size, seed))


def test_minibatch_cka_with_one_batch_is_the_exact_debiased_cka():
    x, y = related(64, 10, 6, 0.5, seed=5)
    assert minibatch_cka(feature_batches(x, y, 64, seed=0)) == pytest.approx(
        linear_cka(x, y, debiased=True), abs=1e-12)


def test_minibatch_cka_agrees_with_exact_and_avoids_the_biased_small_batch_inflation():
    x, y = related(600, 20, 10, 1.0, seed=6)
    exact = linear_cka(x, y, debiased=True)
    assert minibatch_cka(feature_batches(x, y, 50, seed=0)) == pytest.approx(exact, abs=0.03)
    # Independent high-dimensional data: population CKA is 0. Unbiased minibatch HSIC stays
    # near 0; the biased estimator, averaged the same way, is inflated by its 1/n bias.
    rng = np.random.default_rng(7)
    a, b = rng.standard_normal((600, 500)), rng.standard_normal((600, 500))
    assert abs(minibatch_cka(feature_batches(a, b, 50, seed=0))) < 0.05
    biased = np.mean([cka_from_grams(kx, ky, debiased=False)
                      for kx, ky in feature_batches(a, b, 50, seed=0)])
    assert biased > 0.5


def test_distance_spearman_hand_checked():
    # Pair distances (01, 02, 12): x -> (1, 3, 2), y -> (2, 3, 1); rank differences (-1, 0, 1):
    # rho = 1 - 6 * 2 / (3 * 8) = 0.5.
    x = np.array([[0.0], [1.0], [3.0]])
    y = np.array([[0.0], [2.0], [3.0]])
    dx, dy = squared_distances(linear_gram(x)), squared_distances(linear_gram(y))
    assert distance_spearman(dx, dy) == pytest.approx(0.5)
    assert distance_spearman(dx, 4 * dx) == pytest.approx(1.0)


def test_knn_recall_hand_checked():
    x = np.array([0, 1, 2, 10, 11, 12], dtype=float)[:, None]
    y = np.array([0, 1, 10, 2, 11, 12], dtype=float)[:, None]  # points 2 and 3 swap clusters
    dx, dy = squared_distances(linear_gram(x)), squared_distances(linear_gram(y))
    # Neighbours (k=2) in x: {1,2} {0,2} {0,1} {4,5} {3,5} {3,4};
    # in y: {1,3} {0,3} {4,5} {0,1} {2,5} {2,4}.
    assert knn_recall(dx, dy, k=2).tolist() == [0.5, 0.5, 0.0, 0.0, 0.5, 0.5]
    assert knn_recall(dx, dx, k=2).mean() == 1.0


def test_ridge_r2_picks_alpha_on_val_and_scores_test():
    rng = np.random.default_rng(8)
    x = {s: rng.standard_normal((n, 8)) for s, n in [("train", 200), ("val", 50), ("test", 50)]}
    w = rng.standard_normal((8, 3))
    y = {s: v @ w + 0.01 * rng.standard_normal((len(v), 3)) for s, v in x.items()}
    r2, alpha, prediction = ridge_r2(x, y, [1e-4, 1.0, 100.0])
    assert r2 > 0.99 and alpha == 1e-4 and prediction.shape == (50, 3)
    noise = {s: rng.standard_normal((len(v), 3)) for s, v in x.items()}
    assert ridge_r2(x, noise, [1e-4, 1.0, 100.0])[0] < 0.05
    assert r2_score(y["test"], y["test"]) == 1.0

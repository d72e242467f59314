"""95% intervals for alignment metrics over the sample of images.

Metrics on pairs of images (CKA, distance Spearman) cannot be bootstrapped by drawing images
with replacement: a drawn-twice image pairs with itself, which is exactly the diagonal term the
unbiased estimators leave out. They use half-sampling instead (McCarthy 1969): the statistic on
random halves drawn without replacement, whose deviation from the full-sample value has the
same variance as the full-sample statistic's (exactly so for means), so the interval is the
full-sample value plus the deviations' 2.5% and 97.5% quantiles. The deviations are centred
first: an estimator whose bias depends on n (biased HSIC) is further off on half-size samples,
and that extra bias is not sampling error of the full-sample value.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from vlmprobe.metrics.finite import require_finite

LEVEL = 0.95


def half_sample_ci(
    statistic: Callable[[np.ndarray], float], n: int, rounds: int, seed: int
) -> tuple[float, float]:
    """Interval for `statistic(index)` (index: the images to use) over n images."""
    rng = np.random.default_rng(seed)
    full = statistic(np.arange(n))
    deviations = np.array(
        [statistic(np.sort(rng.permutation(n)[: n // 2])) for _ in range(rounds)]
    )
    require_finite("half_sample_ci statistic (all images)", full)
    require_finite("half_sample_ci statistic (half samples)", deviations)
    deviations -= deviations.mean()
    tail = (1.0 - LEVEL) / 2.0
    lo, hi = np.quantile(deviations, [tail, 1.0 - tail])
    return float(full + lo), float(full + hi)


def bootstrap_mean_ci(values: np.ndarray, rounds: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-image values."""
    require_finite("bootstrap_mean_ci(values)", values)
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(rounds, len(values)))].mean(axis=1)
    tail = (1.0 - LEVEL) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)

"""Intervals for alignment metrics: right width on statistics whose sampling error is known."""

from __future__ import annotations

import numpy as np
import pytest

from vlmprobe.align.intervals import bootstrap_mean_ci, half_sample_ci


def test_half_sample_interval_of_a_mean_has_the_textbook_width():
    values = np.random.default_rng(0).standard_normal(400)
    lo, hi = half_sample_ci(lambda index: float(values[index].mean()), len(values), 400, seed=1)
    assert lo < values.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 / np.sqrt(400), rel=0.2)


def test_bootstrap_mean_interval_has_the_textbook_width_and_is_seeded():
    values = np.random.default_rng(2).standard_normal(400)
    lo, hi = bootstrap_mean_ci(values, 1000, seed=3)
    assert lo < values.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 / np.sqrt(400), rel=0.15)
    assert bootstrap_mean_ci(values, 1000, seed=3) == (lo, hi)

"""Box metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from vlmprobe.metrics.boxes import (
    bootstrap_ci,
    box_iou_matrix,
    matched_iou,
    ratio_of_sums,
    xyxy_to_xywh,
)


def test_iou_of_identical_disjoint_and_half_overlapping_boxes():
    a = np.array([[0, 0, 10, 10]])
    b = np.array([[0, 0, 10, 10], [20, 20, 30, 30], [5, 0, 15, 10]])
    np.testing.assert_allclose(box_iou_matrix(a, b), [[1.0, 0.0, 50 / 150]])


def test_degenerate_boxes_give_zero_not_nan():
    assert box_iou_matrix([[0, 0, 0, 0]], [[0, 0, 0, 0]])[0, 0] == 0.0


def test_matching_pairs_boxes_one_to_one_by_iou():
    gt = np.array([[0, 0, 10, 10], [50, 50, 60, 60]])
    pred = np.array([[50, 50, 60, 60], [0, 0, 10, 10]])  # same boxes, swapped order
    assert matched_iou(gt, pred) == (2.0, 2)


def test_spurious_and_missed_boxes_count_as_zero():
    gt = np.array([[0, 0, 10, 10]])
    flooded = np.array([[0, 0, 10, 10]] + [[40 + i, 40, 50 + i, 50] for i in range(4)])
    assert matched_iou(gt, flooded) == (1.0, 5)
    assert matched_iou(gt, np.zeros((0, 4))) == (0.0, 1)
    assert matched_iou(np.zeros((0, 4)), np.zeros((0, 4))) == (0.0, 0)


def test_score_is_the_ratio_of_sums_over_images():
    assert ratio_of_sums(np.array([1.0, 0.5]), np.array([1, 3])) == pytest.approx(1.5 / 4)


def test_bootstrap_interval_brackets_the_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    sums = rng.uniform(0, 2, size=200)
    denoms = np.full(200, 2)
    lo, hi = bootstrap_ci(sums, denoms, n_boot=500, seed=1)
    assert lo < ratio_of_sums(sums, denoms) < hi
    assert (lo, hi) == bootstrap_ci(sums, denoms, n_boot=500, seed=1)
    assert bootstrap_ci(sums, denoms, n_boot=500, seed=2) != (lo, hi)


def test_xyxy_to_xywh():
    np.testing.assert_array_equal(xyxy_to_xywh([[1, 2, 4, 8]]), [[1, 2, 3, 6]])

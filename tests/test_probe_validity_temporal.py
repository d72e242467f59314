"""Control bands and validity; the temporal direction probe on hand-made moving blobs."""

from __future__ import annotations

import numpy as np
import pytest

from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.probes.temporal import (
    TemporalSettings,
    clip_coverage,
    fit_readouts,
    moment_pooling,
    run_temporal_probe,
)
from vlmprobe.probes.validity import Band, probe_validity

BAND = Band(positive_min=0.6, negative_max=0.2, min_gap=0.0)


def test_probe_is_valid_when_both_controls_are_in_band():
    controls = {"oracle": {"iou": 0.8}, "oracle_shuffled": {"iou": 0.05}}
    verdict = probe_validity("bbox", controls, BAND)
    assert verdict["valid"] and verdict["positive_pass"] and verdict["negative_pass"]


@pytest.mark.parametrize(
    ("oracle", "shuffled", "reason"),
    [(0.5, 0.05, "oracle iou 0.500 < 0.6"), (0.8, 0.3, "not clearly below")],
)
def test_probe_is_invalid_when_a_control_misses(oracle, shuffled, reason):
    controls = {"oracle": {"iou": oracle}, "oracle_shuffled": {"iou": shuffled}}
    verdict = probe_validity("bbox", controls, BAND)
    assert not verdict["valid"] and reason in verdict["reason"]


def test_reconstruction_needs_a_gap_between_pixels_and_shuffled():
    band = Band(positive_min=0.7, negative_max=1.0, min_gap=0.3)
    close = {"pixels": {"spatial_iou": 0.8}, "shuffled": {"spatial_iou": 0.6}}
    far = {"pixels": {"spatial_iou": 0.8}, "shuffled": {"spatial_iou": 0.4}}
    assert not probe_validity("reconstruction", close, band)["valid"]
    assert probe_validity("reconstruction", far, band)["valid"]


def test_a_control_that_did_not_run_makes_the_probe_invalid():
    verdict = probe_validity("detr", {"oracle": {"map50": 0.9}}, BAND)
    assert not verdict["valid"] and "oracle_shuffled" in verdict["reason"]


GRID = TokenGeometry.single_grid((64, 64), 8, 8)
BIG = TokenGeometry.single_grid((128, 128), 16, 16)
# Per-frame steps in tokens, about 3 long in each of the 8 directions (as in the data, every
# direction moves at one speed: the displacements lie on a circle).
STEPS = np.rint(3 * np.stack([np.cos(np.arange(8) * np.pi / 4),
                              -np.sin(np.arange(8) * np.pi / 4)], 1)).astype(int)


def _blob_clips(n: int, signal: np.ndarray, rng: np.random.Generator, n_frames: int = 4):
    """(n, F, 256, 16) tokens on a 16x16 grid: a 2x2-token blob (feature `signal` plus noise)
    moving in one of 8 directions from a random start, on random per-clip backgrounds; and its
    coverage (n, F, 256, 1)."""
    direction = rng.integers(0, 8, n)
    tokens = 0.1 * rng.standard_normal((n, n_frames, 256, 16))
    tokens += rng.standard_normal((n, 1, 1, 16))  # a static background feature per clip
    coverage = np.zeros((n, n_frames, 256, 1))
    travel = 3 * (n_frames - 1)
    for i, d in enumerate(direction):
        step = STEPS[d]
        lo = np.where(step < 0, travel, 0)
        hi = 14 - np.where(step > 0, travel, 0)
        x, y = rng.integers(lo, hi + 1)
        for f in range(n_frames):
            cx, cy = x + step[0] * f, y + step[1] * f
            for dy in (0, 1):
                for dx in (0, 1):
                    tokens[i, f, (cy + dy) * 16 + (cx + dx)] += signal
                    coverage[i, f, (cy + dy) * 16 + (cx + dx)] = 1.0
    return tokens, coverage, direction


def test_moment_pooling_gives_the_moments_velocity():
    tokens = np.zeros((1, 2, 64, 1))
    tokens[0, 0, 3 * 8 + 2] = 1.0  # frame 0: column 2
    tokens[0, 1, 3 * 8 + 5] = 1.0  # frame 1: column 5 (moved 3 tokens = 3/8 right)
    mass, x, y = moment_pooling(tokens, GRID)[0]
    assert x == pytest.approx(3 / 8 / 64)  # the x moment's change per frame
    assert mass == pytest.approx(0.0) and y == pytest.approx(0.0)


def test_temporal_probe_reads_direction_from_moving_blobs():
    rng = np.random.default_rng(0)
    tokens, coverage, direction = _blob_clips(240, rng.standard_normal(16), rng)
    ids = {"train": np.arange(160), "val": np.arange(160, 200), "test": np.arange(200, 240)}
    settings = TemporalSettings(ridge_alphas=[0.001, 0.1], penalties=[0.1, 1.0, 10.0],
                                readout_frames=2, bootstrap=200, seed=0)
    readouts = fit_readouts(lambda c: tokens[c], coverage, ids["train"], settings)
    pooled = {s: moment_pooling(tokens[i], BIG) for s, i in ids.items()}
    result = run_temporal_probe(pooled, {s: direction[i] for s, i in ids.items()}, readouts,
                                settings)
    assert result["direction_acc"] >= 0.9
    lo, hi = result["direction_acc_ci95"]
    assert lo <= result["direction_acc"] <= hi


def test_clip_coverage_puts_the_mover_in_its_class_channel():
    cov = clip_coverage(
        boxes=[[[0, 0, 8, 8], [8, 0, 8, 8]]], category_ids=[2],
        distractor_boxes=[[56, 56, 8, 8]], categories=[1, 2, 3], geometry=GRID,
    )
    assert cov.shape == (1, 2, 64, 3)
    assert cov[0, 0, 0, 1] == 1.0 and cov[0, 1, 1, 1] == 1.0  # class 2 -> channel 1
    assert cov.sum() == 2.0  # nothing else: the distractor is left out
    half = clip_coverage([[[4, 0, 8, 8]]], [1], [None], [1, 2, 3], GRID)
    assert half[0, 0, :2, 0].tolist() == [0.5, 0.5]

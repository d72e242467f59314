"""Tokens pooled onto a latent grid by area overlap."""

from __future__ import annotations

import numpy as np

from vlmprobe.align.pooling import pool_tokens
from vlmprobe.extract.geometry import TokenGeometry, area_weights


def test_area_weights_average_the_covered_tokens():
    fine = TokenGeometry.single_grid((4, 4), 4, 4)  # 1-px tokens
    coarse = TokenGeometry.single_grid((4, 4), 2, 2)  # 2-px cells
    weights = area_weights(fine, coarse)
    assert weights.shape == (4, 16) and np.allclose(weights.sum(axis=1), 1.0)
    tokens = np.arange(16, dtype=np.float32).reshape(1, 16, 1)
    assert pool_tokens(tokens, weights)[0, :, 0].tolist() == [2.5, 4.5, 10.5, 12.5]


def test_uneven_grids_weight_by_overlap():
    source = TokenGeometry.single_grid((3, 3), 1, 3)  # three 1-px wide columns
    target = TokenGeometry.single_grid((3, 3), 1, 2)  # two 1.5-px wide columns
    assert np.allclose(area_weights(source, target), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]])


def test_pooling_a_chunk_of_images_at_a_time_gives_the_whole_arrays_result(monkeypatch):
    import vlmprobe.align.pooling as pooling
    from vlmprobe.extract.tokens import ArrayTokens

    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((23, 16, 8)).astype(np.float32)
    weights = rng.random((4, 16)).astype(np.float32)
    whole = pooling.pool_tokens(tokens, weights)
    monkeypatch.setattr(pooling, "POOL_ELEMENTS", 3 * 16 * 8)  # chunks of 3 images
    chunked = pooling.pool_tokens(ArrayTokens(tokens), weights)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    np.testing.assert_allclose(whole, np.einsum("pt,ntd->npd", weights, tokens), atol=1e-5)

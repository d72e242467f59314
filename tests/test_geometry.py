"""Token geometry: token boxes, rendering to pixels, coverage targets and pixel patches."""

from __future__ import annotations

import numpy as np

from vlmprobe.extract.geometry import Grid, TokenGeometry, patchify, region_coverage


def test_single_grid_token_boxes_tile_the_image_row_major():
    g = TokenGeometry.single_grid((28, 42), rows=2, cols=3)
    boxes = g.token_boxes()
    assert boxes.shape == (6, 4)
    np.testing.assert_allclose(boxes[0], [0, 0, 14, 14])
    np.testing.assert_allclose(boxes[2], [28, 0, 42, 14])  # row-major: third token ends row 0
    np.testing.assert_allclose(boxes[3], [0, 14, 14, 28])


def test_geometry_round_trips_through_its_dict_form():
    g = TokenGeometry((224, 224), (Grid(16, 16, (0, 0, 224, 224)), Grid(2, 2, (0, 0, 112, 112))))
    assert TokenGeometry.from_dict(g.to_dict()) == g
    assert g.n_tokens == 260


def test_render_of_constant_values_is_constant_where_covered():
    g = TokenGeometry((20, 20), (Grid(2, 2, (0, 0, 10, 10)),))
    pixels = g.render(np.full((4, 1), 0.7))
    np.testing.assert_allclose(pixels[:10, :10], 0.7, rtol=1e-6)
    assert pixels[10:, :].max() == 0.0  # no grid covers it


def test_render_places_each_token_over_its_own_cell():
    g = TokenGeometry.single_grid((40, 40), rows=4, cols=4)
    values = np.zeros((16, 1))
    values[5] = 1.0  # row 1, col 1: pixels 10..20
    pixels = g.render(values)[..., 0]
    assert np.unravel_index(pixels.argmax(), pixels.shape)[0] in range(10, 20)
    assert np.unravel_index(pixels.argmax(), pixels.shape)[1] in range(10, 20)


def test_region_coverage_is_the_exact_covered_fraction():
    mask = np.zeros((1, 28, 28), dtype=bool)
    mask[0, 0:14, 0:7] = True  # half of the first 14x14 cell
    cov = region_coverage(mask, TokenGeometry.single_grid((28, 28), 2, 2).token_boxes())
    np.testing.assert_allclose(cov[:, 0], [0.5, 0.0, 0.0, 0.0])


def test_patchify_gives_raw_patches_in_token_order():
    images = np.zeros((1, 28, 28, 3), dtype=np.uint8)
    images[0, 14:, 14:] = 255  # bottom-right cell white
    tokens = patchify(images, TokenGeometry.single_grid((28, 28), 2, 2), patch_px=14)
    assert tokens.shape == (1, 4, 3 * 14 * 14)
    np.testing.assert_allclose(tokens[0].mean(axis=1), [0, 0, 0, 1])

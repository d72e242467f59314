"""Image metrics against small hand-computed cases, and LPIPS against the lpips package."""

from __future__ import annotations

from pathlib import Path

import lpips
import numpy as np
import pytest
import torch

from vlmprobe.assets.lpips_weights import build_lpips
from vlmprobe.metrics.image import (
    Lpips,
    edge_f1_maps,
    edge_map,
    mask_iou,
    recover_masks,
    spatial_iou,
    ssim,
)

ROOT = Path(__file__).resolve().parents[1]


def test_ssim_of_an_image_with_itself_is_one():
    image = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    assert ssim(image, image) == pytest.approx(1.0)


def test_ssim_of_two_constant_images_is_the_luminance_term():
    # Variances and covariance vanish, so SSIM = (2 mx my + C1) / (mx^2 + my^2 + C1).
    a, b = np.full((16, 16), 0.2), np.full((16, 16), 0.6)
    c1 = 0.01**2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert ssim(a, b) == pytest.approx(expected, rel=1e-9)


def test_ssim_of_an_image_and_its_negative_is_negative():
    # For x and 1 - x the contrast-structure term is (c2 - 2 var) / (2 var + c2) < 0 wherever the
    # image varies; with a fine checkerboard it dominates.
    checker = (np.indices((16, 16)).sum(axis=0) % 2).astype(float)
    assert ssim(checker, 1.0 - checker) < -0.9


def test_edge_f1_maps_hand_case():
    reference = np.zeros((10, 10), dtype=bool)
    reference[5, 1:9] = True  # 8 reference edge pixels on row 5
    predicted = np.zeros((10, 10), dtype=bool)
    predicted[6, 1:5] = True  # 4 pixels one row off: within tolerance 1, not 0
    predicted[0, 0] = True  # 1 spurious pixel
    # tolerance 1: precision 4/5; the 4 predicted pixels cover reference columns 0..5 -> 5 of 8
    # reference pixels (columns 1..5) found: recall 5/8.
    p, r = 4 / 5, 5 / 8
    assert edge_f1_maps(predicted, reference, tolerance=1) == pytest.approx(2 * p * r / (p + r))
    assert edge_f1_maps(predicted, reference, tolerance=0) == 0.0
    assert edge_f1_maps(reference, reference, tolerance=0) == 1.0


def test_edge_map_finds_a_step_and_nothing_on_flat_ground():
    image = np.zeros((12, 12))
    image[:, 6:] = 1.0
    edges = edge_map(image, threshold=0.25)
    assert edges[:, 5].all() and edges[:, 6].all()
    assert not edges[:, :4].any() and not edges[:, 8:].any()
    assert not edge_map(np.full((8, 8), 0.5), threshold=0.01).any()


def test_mask_iou_hand_case():
    a = np.zeros((4, 4), dtype=bool)
    b = np.zeros((4, 4), dtype=bool)
    a[0:2, 0:2] = True  # 4 px
    b[1:3, 1:3] = True  # 4 px, 1 shared
    assert mask_iou(a, b) == pytest.approx(1 / 7)
    assert mask_iou(a, a) == 1.0


def _scene() -> tuple[np.ndarray, np.ndarray]:
    image = np.zeros((20, 20, 3), dtype=np.uint8)
    image[:] = (40, 40, 40)
    masks = np.zeros((3, 20, 20), dtype=bool)
    masks[0, 2:6, 2:6] = True
    masks[1, 10:14, 10:14] = True
    masks[2, 2:6, 12:18] = True
    image[masks[0]] = (250, 0, 0)
    image[masks[1]] = (0, 0, 250)
    image[masks[2]] = (0, 0, 250)  # the same blue as object 1
    return image, masks


def test_spatial_iou_of_a_perfect_reconstruction_is_one():
    image, masks = _scene()
    assert spatial_iou(image, image, masks) == [1.0, 1.0, 1.0]


def test_spatial_iou_hand_case_with_a_shifted_object_and_shared_colours():
    image, masks = _scene()
    reconstruction = image.copy()
    reconstruction[masks[0]] = (40, 40, 40)
    reconstruction[3:7, 2:6] = (240, 10, 10)  # red square moved down one row: IoU 12 / 20
    scores = spatial_iou(reconstruction, image, masks)
    assert scores[0] == pytest.approx(12 / 20)
    # Both blue objects are scored against the union of the blue masks, which is intact.
    assert scores[1:] == [1.0, 1.0]
    recovered = recover_masks(reconstruction, image, masks)
    assert (recovered[1] == (masks[1] | masks[2])).all()


def test_spatial_iou_of_a_blank_reconstruction_is_zero():
    image, masks = _scene()
    blank = np.full_like(image, 40)
    assert spatial_iou(blank, image, masks) == [0.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def lpips_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real converted weights where the assets stage has run; else seeded random weights in
    the same layout (the comparison below only needs both sides to use the same file)."""
    real = ROOT / "data" / "assets" / "lpips"
    if (real / "alex.pth").exists():
        return real
    out = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    torch.save(build_lpips("alex").state_dict(), out / "alex.pth")
    return out


def test_lpips_wrapper_equals_the_lpips_package_with_the_same_weights(lpips_assets):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    ours = Lpips("alex", lpips_assets)(a, b, batch_size=2)

    reference = build_lpips("alex")
    reference.load_state_dict(torch.load(lpips_assets / "alex.pth", weights_only=True))
    reference.eval()
    with torch.no_grad():
        expected = [
            reference(lpips.im2tensor(x), lpips.im2tensor(y)).item()
            for x, y in zip(a, b, strict=True)
        ]
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    assert Lpips("alex", lpips_assets)(a, a).max() < 1e-6

"""Image metrics for reconstructions: pure functions on numpy arrays.

Images are (H, W, 3) uint8 or float in [0, 1]; masks and edge maps are (H, W) bool.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from vlmprobe.assets.lpips_weights import load_lpips
from vlmprobe.metrics.finite import require_finite

# SSIM constants of Wang et al. (2004): an 11x11 Gaussian window with sigma 1.5.
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # (11 - 1) / 2 / 1.5 rounds to this: an 11-tap window
SSIM_K1, SSIM_K2 = 0.01, 0.03


def as_float(image: np.ndarray) -> np.ndarray:
    """uint8 images to float64 in [0, 1]; float images are taken to be in [0, 1] already."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    return image.astype(np.float64)


def grey(image: np.ndarray) -> np.ndarray:
    """Luma (ITU-R BT.601) of an (H, W, 3) image, or the image itself if already (H, W)."""
    image = as_float(image)
    if image.ndim == 2:
        return image
    return image @ np.array([0.299, 0.587, 0.114])


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two images (data range 1), channels averaged.

    Local means, variances and covariance use a Gaussian window (sigma 1.5, 11 taps) with
    reflected borders; the per-pixel SSIM map is averaged over pixels and channels.
    """
    require_finite("ssim(a)", a)
    require_finite("ssim(b)", b)
    a, b = as_float(a), as_float(b)
    if a.shape != b.shape:
        raise ValueError(f"ssim needs equal shapes, got {a.shape} and {b.shape}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    scores = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch], b[..., ch]

        def blur(z: np.ndarray) -> np.ndarray:
            return ndimage.gaussian_filter(z, SSIM_SIGMA, mode="reflect", truncate=SSIM_TRUNCATE)

        mx, my = blur(x), blur(y)
        vx = blur(x * x) - mx * mx
        vy = blur(y * y) - my * my
        cov = blur(x * y) - mx * my
        num = (2 * mx * my + c1) * (2 * cov + c2)
        den = (mx * mx + my * my + c1) * (vx + vy + c2)
        scores.append(float(np.mean(num / den)))
    return float(np.mean(scores))


def edge_map(image: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels whose Sobel gradient magnitude of the luma exceeds `threshold` (luma in [0, 1]).

    The Sobel kernels are normalised (divided by 8), so a step of height h across a straight
    edge gives a magnitude of h / 2 on the two pixels either side of it.
    """
    require_finite("edge_map(image)", image)  # NaN > threshold is False: no edge, silently
    luma = grey(image)
    gx = ndimage.sobel(luma, axis=1, mode="nearest") / 8.0
    gy = ndimage.sobel(luma, axis=0, mode="nearest") / 8.0
    return np.hypot(gx, gy) > threshold


def edge_f1_maps(predicted: np.ndarray, reference: np.ndarray, tolerance: int) -> float:
    """F1 of two edge maps, each edge pixel counting as found within `tolerance` px.

    Precision: the fraction of predicted edge pixels within `tolerance` (Chebyshev distance)
    of a reference edge pixel; recall: the same the other way round. Two empty maps agree (1).
    """
    predicted = np.asarray(predicted, dtype=bool)
    reference = np.asarray(reference, dtype=bool)
    if not predicted.any() and not reference.any():
        return 1.0
    if not predicted.any() or not reference.any():
        return 0.0
    square = np.ones((2 * tolerance + 1, 2 * tolerance + 1), dtype=bool)
    near_reference = ndimage.binary_dilation(reference, square) if tolerance else reference
    near_predicted = ndimage.binary_dilation(predicted, square) if tolerance else predicted
    precision = (predicted & near_reference).sum() / predicted.sum()
    recall = (reference & near_predicted).sum() / reference.sum()
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def edge_f1(
    reconstruction: np.ndarray, original: np.ndarray, threshold: float, tolerance: int
) -> float:
    """Edge F1 of a reconstruction against its original (see `edge_map`, `edge_f1_maps`)."""
    return edge_f1_maps(
        edge_map(reconstruction, threshold), edge_map(original, threshold), tolerance
    )


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; two empty masks have IoU 1."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    union = np.logical_or(a, b).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(a, b).sum() / union)


def object_palette(original: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, list[list[int]]]:
    """The original image's colours and which objects share one.

    Returns the palette (1 + K, 3): the background (median colour outside every object), then
    each object's median colour inside its mask; and for each object the indices of the objects
    of its colour (itself included).
    """
    require_finite("object_palette(original)", original)
    orig = as_float(original)
    masks = np.asarray(masks, dtype=bool)
    background = ~masks.any(axis=0)
    palette = np.asarray(
        [np.median(orig[background], axis=0)] + [np.median(orig[m], axis=0) for m in masks]
    ).reshape(-1, 3)
    groups = [
        np.flatnonzero(np.all(np.abs(palette[1:] - palette[1 + k]) < 1e-6, axis=1)).tolist()
        for k in range(len(masks))
    ]
    return palette, groups


def recover_masks(
    reconstruction: np.ndarray, original: np.ndarray, masks: np.ndarray
) -> np.ndarray:
    """Object masks read off a reconstruction by nearest-colour assignment.

    Every reconstructed pixel goes to the nearest colour of the original's palette
    (`object_palette`: background plus each object's colour); object k's recovered mask is the
    pixels assigned to its colour. Objects sharing a colour share one recovered mask: colour
    cannot tell them apart, and using their positions would leak layout into the score.

    masks: (K, H, W) bool ground-truth masks. Returns (K, H, W) bool.
    """
    require_finite("recover_masks(reconstruction)", reconstruction)  # argmin of NaN is 0
    rec = as_float(reconstruction)
    palette, groups = object_palette(original, masks)
    distance = ((rec[:, :, None, :] - palette[None, None]) ** 2).sum(axis=-1)
    nearest = distance.argmin(axis=-1)
    recovered = np.zeros(np.shape(masks), dtype=bool)
    for k, group in enumerate(groups):
        recovered[k] = np.isin(nearest, 1 + np.asarray(group))
    return recovered


def spatial_iou(reconstruction: np.ndarray, original: np.ndarray, masks: np.ndarray) -> list[float]:
    """Per-object IoU of the masks recovered from a reconstruction (`recover_masks`) with the
    ground truth; objects sharing a colour are scored against the union of their masks."""
    masks = np.asarray(masks, dtype=bool)
    recovered = recover_masks(reconstruction, original, masks)
    _, groups = object_palette(original, masks)
    return [mask_iou(recovered[k], masks[g].any(axis=0)) for k, g in enumerate(groups)]


class Lpips:
    """LPIPS distance with the real weights converted by the `assets` stage."""

    def __init__(self, net: str, assets_dir: Path | str, device: torch.device | str = "cpu"):
        self.model = load_lpips(net, Path(assets_dir)).to(device)
        self.device = torch.device(device)

    @staticmethod
    def to_tensor(images: np.ndarray) -> torch.Tensor:
        """(N, H, W, 3) uint8 or [0, 1] float to the (N, 3, H, W) [-1, 1] tensor LPIPS expects."""
        x = torch.from_numpy(as_float(images)).float()
        return x.permute(0, 3, 1, 2) * 2.0 - 1.0

    def __call__(self, a: np.ndarray, b: np.ndarray, batch_size: int = 16) -> np.ndarray:
        """Per-image LPIPS distance between (N, H, W, 3) image batches `a` and `b`."""
        require_finite("Lpips(a)", a)
        require_finite("Lpips(b)", b)
        out = []
        with torch.no_grad():
            for s in range(0, len(a), batch_size):
                d = self.model(self.to_tensor(a[s : s + batch_size]).to(self.device),
                               self.to_tensor(b[s : s + batch_size]).to(self.device))
                out.append(d.reshape(-1).cpu().numpy())
        return np.concatenate(out).astype(np.float64)

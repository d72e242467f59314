"""Box metrics: pure functions on numpy arrays, boxes as (x0, y0, x1, y1) in pixels."""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from vlmprobe.metrics.finite import require_finite


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in `a` (N, 4) with every box in `b` (M, 4): an (N, M) matrix."""
    require_finite("box_iou_matrix(a)", a)
    require_finite("box_iou_matrix(b)", b)
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def matched_iou(gt: np.ndarray, pred: np.ndarray) -> tuple[float, int]:
    """Pair boxes one-to-one by Hungarian matching on IoU.

    Returns (sum of the paired IoUs, max(#gt, #pred)). Dividing the first by the second
    scores a missed object and a spurious box alike as 0, so flooding an image with boxes
    cannot raise the score.
    """
    require_finite("matched_iou(gt)", gt)  # also where one side is empty and no IoU is taken
    require_finite("matched_iou(pred)", pred)
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    pred = np.asarray(pred, dtype=np.float64).reshape(-1, 4)
    denom = max(len(gt), len(pred))
    if len(gt) == 0 or len(pred) == 0:
        return 0.0, denom
    iou = box_iou_matrix(gt, pred)
    rows, cols = linear_sum_assignment(iou, maximize=True)
    return float(iou[rows, cols].sum()), denom


def ratio_of_sums(sums: np.ndarray, denoms: np.ndarray) -> float:
    """The dataset-level score: total paired IoU over total slots."""
    require_finite("ratio_of_sums(sums)", sums)
    require_finite("ratio_of_sums(denoms)", denoms)
    total = float(np.sum(denoms))
    return float(np.sum(sums)) / total if total > 0 else 0.0


def bootstrap_ci(
    sums: np.ndarray, denoms: np.ndarray, n_boot: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of `ratio_of_sums`, resampling images with replacement."""
    require_finite("bootstrap_ci(sums)", sums)
    require_finite("bootstrap_ci(denoms)", denoms)
    sums = np.asarray(sums, dtype=np.float64)
    denoms = np.asarray(denoms, dtype=np.float64)
    n = len(sums)
    if n == 0:
        return (0.0, 0.0)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boot_denoms = denoms[idx].sum(axis=1)
    boot = np.divide(
        sums[idx].sum(axis=1), boot_denoms, out=np.zeros(n_boot), where=boot_denoms > 0
    )
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)

"""One finiteness check shared by every metric: a NaN or inf never becomes a plausible score.

Non-finite input does not make numpy or pycocotools fail; it makes them lie. One NaN feature
turns every CKA variant into 0.0, and a NaN box counts as a hit in mAP (pycocotools tests
`iou < threshold`, which is False for NaN). So metrics refuse such input instead of scoring it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


class NonFiniteInput(ValueError):
    """A metric was given NaN or inf values."""


def nonfinite_counts(values: Any) -> tuple[int, int, int]:
    """(NaN count, inf count, total count) of a numpy array, torch tensor, list or scalar.

    Integer and boolean values are finite by construction and are not scanned.
    """
    if isinstance(values, torch.Tensor):
        if not (values.is_floating_point() or values.is_complex()):
            return 0, 0, values.numel()
        finite = torch.isfinite(values)
        if bool(finite.all()):  # the common case: one pass, nothing else computed
            return 0, 0, values.numel()
        n_nan = int(torch.isnan(values).sum())
        return n_nan, int((~finite).sum()) - n_nan, values.numel()
    dtype = getattr(values, "dtype", None)
    if isinstance(dtype, np.dtype) and not np.issubdtype(dtype, np.inexact):  # not converted:
        return 0, 0, int(np.prod(values.shape))  # an image array may decode on conversion
    array = np.asarray(values)
    if not np.issubdtype(array.dtype, np.inexact):
        if array.dtype == object:  # e.g. a ragged list: check each element
            counts = [nonfinite_counts(v) for v in array.ravel()]
            return tuple(int(sum(c[i] for c in counts)) for i in range(3))  # type: ignore
        return 0, 0, array.size
    finite = np.isfinite(array)
    if finite.all():
        return 0, 0, array.size
    n_nan = int(np.isnan(array).sum())
    return n_nan, int(array.size - finite.sum()) - n_nan, array.size


def describe_nonfinite(n_nan: int, n_inf: int, total: int) -> str:
    """'3 NaN and 1 inf among 1200 values'."""
    return f"{n_nan} NaN and {n_inf} inf among {total} values"


def require_finite(name: str, values: Any) -> None:
    """Raise NonFiniteInput naming `name` (the function and argument) if `values` holds a NaN
    or inf; otherwise return without copying or changing anything."""
    n_nan, n_inf, total = nonfinite_counts(values)
    if n_nan or n_inf:
        raise NonFiniteInput(
            f"{name}: {describe_nonfinite(n_nan, n_inf, total)}; a metric of non-finite input "
            "is meaningless (NaN compares false, so it scores as 0 or as a hit), so it is "
            "refused. Fix: find where the values stopped being finite upstream (the extract "
            "stage refuses non-finite features; a trained probe or decoder that diverged "
            "shows it in its training curves) and rerun that stage."
        )

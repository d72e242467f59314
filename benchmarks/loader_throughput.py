"""Images per second of vlmprobe's image loader alone (decoding in worker processes), no model.

By default it writes `--images` JPEGs the size of a typical COCO image (640x480) to a temporary
directory and decodes them with each worker count; `--dir` reads your own (e.g. COCO's val2017
or the data stage's data/images/images) instead. One untimed warm-up pass fills the page cache.

    python benchmarks/loader_throughput.py --workers 0 2 4
    python benchmarks/loader_throughput.py --dir /path/to/coco/val2017 --limit 1000 --workers 0 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vlmprobe.data.loader import parallel_map, read_rgb

SUFFIXES = {".jpg", ".jpeg", ".png"}


def write_jpegs(root: Path, n: int, width: int = 640, height: int = 480) -> list[Path]:
    """Smooth random scenes with noise: JPEGs about as costly to decode as photographs."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        scene = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), float)
        scene = np.clip(scene + rng.normal(0, 12, scene.shape), 0, 255).astype(np.uint8)
        path = root / f"{i:06d}.jpg"
        Image.fromarray(scene).save(path, quality=90)
        paths.append(path)
    return paths


def images_per_second(paths: list[Path], workers: int) -> float:
    started = time.perf_counter()
    decoded = parallel_map(read_rgb, paths, workers, desc=f"{workers} workers")
    elapsed = time.perf_counter() - started
    assert len(decoded) == len(paths)
    return len(paths) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="images to read (default: generated JPEGs)")
    parser.add_argument("--images", type=int, default=256, help="JPEGs to generate")
    parser.add_argument("--limit", type=int, help="read at most this many files of --dir")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.dir:
            paths = sorted(p for p in args.dir.iterdir() if p.suffix.lower() in SUFFIXES)
            paths = paths[: args.limit] if args.limit else paths
            source = str(args.dir)
        else:
            paths = write_jpegs(Path(tmp), args.images)
            source = f"{args.images} generated 640x480 JPEGs"
        parallel_map(read_rgb, paths, 0, desc="warm-up")
        rates = {w: round(images_per_second(paths, w), 1) for w in args.workers}
    print(json.dumps({
        "source": source, "images": len(paths), "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "images_per_second": {f"{w} workers": r for w, r in rates.items()},
    }, indent=2))


if __name__ == "__main__":
    main()

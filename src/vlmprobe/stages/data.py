"""Stage `data`: generate the synthetic shapes and moving-shapes datasets under `--out`."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from vlmprobe.data.moving_shapes import generate_moving_shapes, max_speed
from vlmprobe.data.shapes import MIN_SHAPE_SIZE, generate_shapes
from vlmprobe.params import ParamsError, load_params, require_int

PARAMS = ("data",)

MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 2048
MAX_SPLIT_SIZE = 1_000_000
MAX_OBJECTS = 16
MAX_FRAMES = 64


def _split_sizes(params: dict[str, Any], section: str) -> dict[str, int]:
    return {
        key: require_int(params, f"{section}.{key}", 1, MAX_SPLIT_SIZE)
        for key in ("n_train", "n_val", "n_test")
    }


def _require_speed(params: dict[str, Any], image_size: int, n_frames: int) -> int:
    fastest = max_speed(image_size, n_frames)
    if fastest < 1:
        raise ParamsError(
            f"params.yaml: data.moving_shapes.n_frames = {n_frames} is too many for "
            f"data.image_size = {image_size}: even at 1 px/frame the object leaves the frame. "
            "Fix: lower data.moving_shapes.n_frames or raise data.image_size."
        )
    return require_int(params, "data.moving_shapes.speed", 1, fastest)


def validate(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check every `data` param; return the keyword arguments of the two generators."""
    common = {
        "seed": require_int(params, "data.seed", 0, 2**32 - 1),
        "image_size": require_int(params, "data.image_size", MIN_IMAGE_SIZE, MAX_IMAGE_SIZE),
    }
    image_size = common["image_size"]
    min_objects = require_int(params, "data.shapes.min_objects", 1, MAX_OBJECTS)
    min_size = require_int(params, "data.shapes.min_size", MIN_SHAPE_SIZE, image_size)
    shapes = {
        **common,
        **_split_sizes(params, "data.shapes"),
        "min_objects": min_objects,
        "max_objects": require_int(params, "data.shapes.max_objects", min_objects, MAX_OBJECTS),
        "min_size": min_size,
        "max_size": require_int(params, "data.shapes.max_size", min_size, image_size),
    }
    n_frames = require_int(params, "data.moving_shapes.n_frames", 2, MAX_FRAMES)
    moving = {
        **common,
        **_split_sizes(params, "data.moving_shapes"),
        "n_frames": n_frames,
        "speed": _require_speed(params, image_size, n_frames),
    }
    return shapes, moving


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("data"), help="output directory")
    args = parser.parse_args(argv)
    try:
        shapes_settings, moving_settings = validate(load_params(PARAMS))
    except ParamsError as e:
        raise SystemExit(f"error: {e}") from None

    started = time.perf_counter()
    summary = {
        "images": generate_shapes(args.out / "images", **shapes_settings),
        "clips": generate_moving_shapes(args.out / "clips", **moving_settings),
    }
    for name in summary:
        summary[name]["size_mb"] = round(_size_mb(args.out / name), 2)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

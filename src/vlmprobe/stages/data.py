"""Stage `data`: write the image dataset to `--images` and the clips to `--clips`.

Whatever `data.dataset` is, the outputs have one format, so every later stage reads them alike:
images as COCO (PNGs at image_size x image_size, instances_{train,val,test}.json with RLE
masks) and clips as clips.npz + clips.json.

- shapes: synthetic shapes and moving-shapes clips (vlmprobe.data.shapes, .moving_shapes).
- coco: a letterboxed subset of a local COCO-format copy (vlmprobe.data.coco); the clips
  stay the synthetic moving shapes, as COCO has no video.
- ssv2: clips of a local Something-Something v2 copy's directional templates
  (vlmprobe.data.ssv2); the images stay the synthetic shapes, as SSv2 has no boxes.

Bad samples follow `data.on_bad_sample` (vlmprobe.data.bad_samples); `--metrics`
(`metrics/data.json`) records the dataset, split sizes and the skipped samples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from vlmprobe.data.bad_samples import POLICIES, apply_policy
from vlmprobe.data.coco import check_source as check_coco_source
from vlmprobe.data.coco import write_coco_subset
from vlmprobe.data.moving_shapes import generate_moving_shapes, max_speed
from vlmprobe.data.shapes import MIN_SHAPE_SIZE, generate_shapes
from vlmprobe.data.ssv2 import check_source as check_ssv2_source
from vlmprobe.data.ssv2 import write_ssv2_subset
from vlmprobe.errors import stage_main
from vlmprobe.io import write_json
from vlmprobe.params import (
    ParamsError,
    get,
    load_params,
    require_bool,
    require_choice,
    require_int,
)

PARAMS = ("data",)
DATASETS = ("shapes", "coco", "ssv2")

MIN_IMAGE_SIZE = 32
MAX_IMAGE_SIZE = 2048
MAX_SPLIT_SIZE = 1_000_000
MAX_OBJECTS = 16
MAX_FRAMES = 64
MAX_WORKERS = 64
MAX_PIXELS_LIMIT = 2**40  # data.max_pixels may be raised, but must stay a number


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


def _require_path(params: dict[str, Any], key: str) -> Path:
    value = get(params, key)
    if not isinstance(value, str) or not value:
        raise ParamsError(f"params.yaml: {key} = {value!r} is invalid; expected a path. "
                          f"Fix: `dvc exp run -S {key}=/path/to/your/copy`.")
    return Path(value).expanduser()


def _wanted(config: dict[str, Any]) -> int:
    return config["n_train"] + config["n_val"] + config["n_test"]


def validate(params: dict[str, Any]) -> dict[str, Any]:
    """Check the `data` params the chosen dataset uses, and a local source's paths and size
    (its index file only: no image is decoded); return each writer's keyword args."""
    dataset = require_choice(params, "data.dataset", DATASETS)
    seed = require_int(params, "data.seed", 0, 2**32 - 1)
    image_size = require_int(params, "data.image_size", MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    config: dict[str, Any] = {
        "dataset": dataset,
        "on_bad_sample": require_choice(params, "data.on_bad_sample", POLICIES),
        "workers": require_int(params, "data.workers", 0, MAX_WORKERS),
        "max_pixels": require_int(params, "data.max_pixels", 1, MAX_PIXELS_LIMIT),
    }
    common = {"seed": seed, "image_size": image_size}
    if dataset in ("shapes", "ssv2"):
        min_objects = require_int(params, "data.shapes.min_objects", 1, MAX_OBJECTS)
        min_size = require_int(params, "data.shapes.min_size", MIN_SHAPE_SIZE, image_size)
        config["shapes"] = {
            **common,
            **_split_sizes(params, "data.shapes"),
            "min_objects": min_objects,
            "max_objects": require_int(params, "data.shapes.max_objects", min_objects,
                                       MAX_OBJECTS),
            "min_size": min_size,
            "max_size": require_int(params, "data.shapes.max_size", min_size, image_size),
        }
    if dataset == "coco":
        config["coco"] = {
            "images_dir": _require_path(params, "data.coco.images"),
            "annotations": _require_path(params, "data.coco.annotations"),
            "seed": seed,
            "image_size": require_int(params, "data.coco.image_size", MIN_IMAGE_SIZE,
                                      MAX_IMAGE_SIZE),
            **_split_sizes(params, "data.coco"),
            "on_bad_sample": config["on_bad_sample"],
            "workers": config["workers"],
            "max_pixels": config["max_pixels"],
            "allow_outside_paths": require_bool(params, "data.coco.allow_outside_paths"),
        }
        check_coco_source(config["coco"]["images_dir"], config["coco"]["annotations"],
                          _wanted(config["coco"]))
    if dataset == "ssv2":
        config["ssv2"] = {
            "videos_dir": _require_path(params, "data.ssv2.videos"),
            "labels": _require_path(params, "data.ssv2.labels"),
            "seed": seed,
            "image_size": require_int(params, "data.ssv2.image_size", MIN_IMAGE_SIZE,
                                      MAX_IMAGE_SIZE),
            "n_frames": require_int(params, "data.ssv2.n_frames", 2, MAX_FRAMES),
            **_split_sizes(params, "data.ssv2"),
            "on_bad_sample": config["on_bad_sample"],
            "workers": config["workers"],
        }
        check_ssv2_source(config["ssv2"]["videos_dir"], config["ssv2"]["labels"],
                          _wanted(config["ssv2"]))
        return config
    n_frames = require_int(params, "data.moving_shapes.n_frames", 2, MAX_FRAMES)
    config["moving_shapes"] = {
        **common,
        **_split_sizes(params, "data.moving_shapes"),
        "n_frames": n_frames,
        "speed": _require_speed(params, image_size, n_frames),
    }
    return config


def _size_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def write_datasets(config: dict[str, Any], images_dir: Path, clips_dir: Path) -> dict[str, Any]:
    """Write images to `images_dir` and clips to `clips_dir`; return what metrics/data.json
    records."""
    dataset = config["dataset"]
    skipped = apply_policy([], config["on_bad_sample"])
    # A local source goes first, so a bad sample stops the stage before anything is written.
    if dataset == "coco":
        images = {"source": "coco", **write_coco_subset(images_dir, **config["coco"])}
        skipped = images.pop("skipped")
    if dataset == "ssv2":
        clips = {"source": "ssv2", **write_ssv2_subset(clips_dir, **config["ssv2"])}
        skipped = clips.pop("skipped")
    if dataset != "coco":
        images = {"source": "shapes", **generate_shapes(images_dir, **config["shapes"])}
    if dataset != "ssv2":
        clips = {"source": "moving_shapes",
                 **generate_moving_shapes(clips_dir, **config["moving_shapes"])}
    return {"dataset": config["dataset"], "images": images, "clips": clips, "skipped": skipped}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=Path, required=True, help="image dataset directory")
    parser.add_argument("--clips", type=Path, required=True, help="clip dataset directory")
    parser.add_argument("--metrics", type=Path, required=True)
    args = parser.parse_args(argv)
    config = validate(load_params(PARAMS))

    started = time.perf_counter()
    metrics = write_datasets(config, args.images, args.clips)
    write_json(args.metrics, metrics)
    sizes = {name: round(_size_mb(path), 2)
             for name, path in (("images", args.images), ("clips", args.clips))}
    print(json.dumps({**metrics, "size_mb": sizes,
                      "seconds": round(time.perf_counter() - started, 1)}, indent=2))
    if metrics["skipped"]["count"]:
        print(f"warning: skipped {metrics['skipped']['count']} bad sample(s) "
              f"(data.on_bad_sample: skip); see {args.metrics}")


if __name__ == "__main__":
    sys.exit(stage_main(main))

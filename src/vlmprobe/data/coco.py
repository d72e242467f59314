"""A deterministic subset of a local COCO-format dataset (COCO 2017 val), letterboxed.

The annotation file's fields are checked first: a field of the wrong type, a missing id or a
duplicate id is an error naming the field, under either policy (no sample can be trusted then).
The subset: the images with at least one non-crowd annotation, in sorted id order, permuted by
`seed`; the first n_train are train, then val, then test. A bad sample found among them
(missing or unreadable image, size or annotation that disagrees with the image) fails the
stage, or under `skip` is left out and the next image in the permutation takes its place.
Every selected image is checked and letterboxed in a worker process, which writes its PNG.
An image is refused before decoding when its header says it has more than `max_pixels` pixels
(a decompression bomb), and when its path leaves the image directory (`../`, an absolute path,
a symlink out) unless `allow_outside_paths`.

The output keeps COCO's format, ids and categories: boxes and masks are in output pixels,
masks as compressed RLE, crowd regions kept with iscrowd 1 (pycocotools ignores detections
on them; the probes do not train on them). An annotation too small to cover half of one output
pixel has an empty mask and is dropped (counted in the summary).
"""

from __future__ import annotations

import math
import stat
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from vlmprobe.data.bad_samples import SHOWN, BadSample, apply_policy
from vlmprobe.data.letterbox import Letterbox
from vlmprobe.data.loader import describe_error, parallel_map
from vlmprobe.data.shapes import encode_rle, save_png
from vlmprobe.errors import VlmprobeError
from vlmprobe.io import atomic_dir, read_json, write_json

BOX_TOLERANCE_PX = 1.0  # COCO's float boxes may overshoot the border by rounding; no more
SECTIONS = ("images", "annotations", "categories")


class SourceError(VlmprobeError, ValueError):
    """The dataset as a whole cannot be read (not one sample of it)."""


def read_annotation_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SourceError(f"annotation file {path} not found. Fix: set data.coco.annotations to "
                          "your instances_val2017.json.")
    try:
        coco = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise SourceError(f"annotation file {path} is not valid JSON ({e}).") from None
    if not isinstance(coco, dict):
        raise SourceError(f"annotation file {path} holds a {type(coco).__name__}, not COCO's "
                          f"object with {', '.join(SECTIONS)}.")
    missing = [key for key in SECTIONS if key not in coco]
    if missing:
        raise SourceError(f"annotation file {path} has no {', '.join(missing)}: not COCO format.")
    problems = format_problems(coco)
    if problems:
        listed = "\n".join(f"  {p}" for p in problems[:SHOWN])
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise SourceError(
            f"annotation file {path} is malformed ({len(problems)} problem(s)):\n{listed}{more}"
            "\nFix: correct those fields (COCO's format: cocodataset.org/#format-data), or point "
            "data.coco.annotations at an intact copy.")
    return coco


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _is_numbers(value: Any) -> bool:
    return isinstance(value, list) and all(map(_is_number, value))


def _is_segmentation(value: Any) -> bool:
    """Polygons (lists of x, y numbers), or RLE: {size: [h, w], counts: str or list of ints}."""
    if isinstance(value, list):
        return all(_is_numbers(p) and len(p) % 2 == 0 for p in value)
    if isinstance(value, dict):
        size, counts = value.get("size"), value.get("counts")
        return (isinstance(size, list) and len(size) == 2 and all(map(_is_int, size))
                and (isinstance(counts, str)
                     or isinstance(counts, list) and all(map(_is_int, counts))))
    return False


# Per section: field -> (check, what it must be, required). The fields this module reads.
FIELDS: dict[str, dict[str, tuple[Any, str, bool]]] = {
    "images": {
        "id": (_is_int, "an integer", True),
        "file_name": (lambda v: isinstance(v, str) and v != "", "a non-empty string", True),
        "width": (lambda v: _is_int(v) and v > 0, "a positive integer", True),
        "height": (lambda v: _is_int(v) and v > 0, "a positive integer", True),
    },
    "annotations": {
        "id": (_is_int, "an integer", True),
        "image_id": (_is_int, "an integer", True),
        "category_id": (_is_int, "an integer", True),
        "bbox": (lambda v: _is_numbers(v) and len(v) == 4, "4 numbers [x, y, width, height]",
                 True),
        "segmentation": (_is_segmentation, "polygons [[x, y, ...]] or RLE {size, counts}",
                         True),
        "iscrowd": (lambda v: _is_int(v) and v in (0, 1), "0 or 1", False),
    },
    "categories": {
        "id": (_is_int, "an integer", True),
        "name": (lambda v: isinstance(v, str), "a string", True),
    },
}


def format_problems(coco: dict[str, Any]) -> list[str]:
    """Every field of the file that is missing, of the wrong type, or a duplicate id."""
    problems = []
    for section in SECTIONS:
        records = coco[section]
        if not isinstance(records, list):
            problems.append(f"`{section}` is a {type(records).__name__}, expected a list of "
                            "objects")
            continue
        where_of_id: dict[Any, list[str]] = defaultdict(list)
        for index, record in enumerate(records):
            where = f"{section}[{index}]"
            if not isinstance(record, dict):
                problems.append(f"{where} is a {type(record).__name__}, expected an object")
                continue
            if _is_int(record.get("id")):
                where = f"{where} (id {record['id']})"
                where_of_id[record["id"]].append(f"{section}[{index}]")
            for field, (check, expected, required) in FIELDS[section].items():
                if field not in record:
                    if required:
                        problems.append(f"{where} has no `{field}`")
                elif not check(record[field]):
                    problems.append(f"{where}: `{field}` = {record[field]!r} must be {expected}")
        for record_id, places in where_of_id.items():
            if len(places) > 1:
                problems.append(f"{section}: id {record_id} is used {len(places)} times "
                                f"({', '.join(places)}); ids must be unique")
    return problems


def dangling_annotations(coco: dict[str, Any], path: Path) -> list[BadSample]:
    """Annotations pointing at an image or category the file does not list."""
    image_ids = {entry["id"] for entry in coco["images"]}
    category_ids = {c["id"] for c in coco["categories"]}
    bad = []
    for a in coco["annotations"]:
        if a["image_id"] not in image_ids:
            bad.append(BadSample(str(path), f"annotation {a['id']} points at image_id "
                                            f"{a['image_id']}, which the file does not list"))
        elif a["category_id"] not in category_ids:
            bad.append(BadSample(str(path), f"annotation {a['id']} has category_id "
                                            f"{a['category_id']}, which the file does not list"))
    return bad


def annotation_problem(a: dict[str, Any], width: int, height: int) -> str | None:
    """Why an annotation cannot be right for a width x height image, or None."""
    bbox = a["bbox"]  # its type and the segmentation's were checked with the file
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return f"annotation {a['id']} has an empty bbox {bbox}"
    t = BOX_TOLERANCE_PX
    if x < -t or y < -t or x + w > width + t or y + h > height + t:
        return f"annotation {a['id']}: bbox {bbox} lies outside the {width}x{height} image"
    segmentation = a["segmentation"]
    if isinstance(segmentation, list):
        points = np.concatenate([np.asarray(p, float) for p in segmentation] or [np.zeros(0)])
        xs, ys = points[0::2], points[1::2]
        if (len(points) and (xs.min() < -t or ys.min() < -t or xs.max() > width + t
                             or ys.max() > height + t)):
            return f"annotation {a['id']}: its polygon lies outside the {width}x{height} image"
    elif segmentation["size"] != [height, width]:
        return (f"annotation {a['id']}: its RLE mask is {segmentation['size']}, the image "
                f"{height}x{width} (height x width)")
    return None


def output_mask(segmentation: Any, box: Letterbox) -> np.ndarray:
    """The annotation's mask at the output resolution: polygons moved and rasterised there,
    RLE decoded and resampled."""
    if isinstance(segmentation, list):
        polygons = [box.points(np.asarray(p, float).reshape(-1, 2)).ravel().tolist()
                    for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((box.size, box.size), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, box.size, box.size))
        return mask_utils.decode(rle).astype(bool)
    if isinstance(segmentation["counts"], list):  # uncompressed RLE
        segmentation = mask_utils.frPyObjects(segmentation, *segmentation["size"])
    return box.mask(mask_utils.decode(segmentation).astype(bool))


def clipped_box(xywh: list[float], size: int) -> list[float]:
    x0, y0 = max(0.0, xywh[0]), max(0.0, xywh[1])
    x1, y1 = min(float(size), xywh[0] + xywh[2]), min(float(size), xywh[1] + xywh[3])
    return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


@dataclass(frozen=True)
class ImageTask:
    entry: dict[str, Any]
    annotations: list[dict[str, Any]]
    images_dir: Path
    out_dir: Path
    size: int
    max_pixels: int
    allow_outside_paths: bool


FILE_KINDS = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket",
              stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device"}


def source_problem(task: ImageTask, path: Path) -> str | None:
    """Why the image file may not be read: outside the image directory, missing, not a file."""
    if not task.allow_outside_paths:
        resolved = path.resolve()
        if not resolved.is_relative_to(task.images_dir.resolve()):
            return (f"file_name {task.entry['file_name']!r} leads outside the image directory "
                    f"{task.images_dir} (to {resolved}), so it is refused. Fix: move the image "
                    "into that directory, or allow such paths with "
                    "`dvc exp run -S data.coco.allow_outside_paths=true`")
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "file not found"
    except OSError as e:
        return f"cannot be read ({describe_error(e)})"
    if not stat.S_ISREG(mode):
        kind = next((name for is_kind, name in FILE_KINDS.items() if is_kind(mode)),
                    "not a plain file")
        return f"is {kind}, not an image file. Fix: replace it with the image file"
    return None


@dataclass(frozen=True)
class PreparedImage:
    entry: dict[str, Any]
    annotations: list[dict[str, Any]]
    dropped: int


def too_many_pixels(pixels: str, max_pixels: int) -> str:
    return (f"refused before decoding: its header says {pixels} pixels, more than "
            f"data.max_pixels = {max_pixels:,} (a decompression bomb?). Fix: remove the image, "
            f"or raise data.max_pixels if you trust it")


def prepare_image(task: ImageTask) -> PreparedImage | BadSample:
    """Check one image and its annotations; letterbox it, writing the PNG; or say what is bad."""
    entry = task.entry
    path = task.images_dir / entry["file_name"]
    problem = source_problem(task, path)
    if problem:
        return BadSample(str(path), problem)
    # PIL's own bomb guard at the same limit while this image is read (a process-wide setting:
    # put back after). In `open` it refuses over twice the limit and only warns below that:
    # the header's size is checked here.
    previous_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, task.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)  # reads the header only: nothing is decoded yet
        with image:
            if image.width * image.height > task.max_pixels:
                return BadSample(str(path), too_many_pixels(
                    f"{image.width}x{image.height} = {image.width * image.height:,}",
                    task.max_pixels))
            image.load()  # decodes every byte: a truncated file fails here, not later
            pixels = image.convert("RGB")
    except Image.DecompressionBombError:
        return BadSample(str(path), too_many_pixels(f"over {2 * task.max_pixels:,}",
                                                    task.max_pixels))
    except (OSError, SyntaxError, ValueError) as e:
        return BadSample(str(path), f"unreadable image ({describe_error(e)})")
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit
    width, height = pixels.size
    if (width, height) != (entry.get("width"), entry.get("height")):
        return BadSample(str(path), f"image is {width}x{height}, the annotation file says "
                                    f"{entry.get('width')}x{entry.get('height')}")
    for a in task.annotations:
        problem = annotation_problem(a, width, height)
        if problem:
            return BadSample(str(path), problem)
    box = Letterbox(width, height, task.size)
    file_name = f"images/{entry['id']:012d}.png"
    annotations, dropped = [], 0
    for a in task.annotations:
        mask = output_mask(a["segmentation"], box)
        if not mask.any():
            dropped += 1
            continue
        annotations.append({
            "id": a["id"], "image_id": entry["id"], "category_id": a["category_id"],
            "bbox": clipped_box(box.box(a["bbox"]), task.size), "area": int(mask.sum()),
            "segmentation": encode_rle(mask), "iscrowd": int(a.get("iscrowd", 0)),
        })
    save_png(box.image(pixels), task.out_dir / file_name)
    out_entry = {"id": entry["id"], "file_name": file_name, "width": task.size,
                 "height": task.size, "source_file": entry["file_name"],
                 "letterbox": box.to_dict()}
    return PreparedImage(out_entry, annotations, dropped)


def candidate_order(coco: dict[str, Any], seed: int) -> list[int]:
    """Ids of images with a non-crowd annotation, sorted, then permuted by `seed`."""
    annotated = sorted({a["image_id"] for a in coco["annotations"] if not a.get("iscrowd", 0)}
                       & {entry["id"] for entry in coco["images"]})
    return [annotated[i] for i in np.random.default_rng(seed).permutation(len(annotated))]


def check_source(images_dir: Path, annotations: Path, wanted: int) -> dict[str, Any]:
    """The source's checks that decode no image (`vlmprobe validate` makes them in seconds):
    both paths exist and the file has `wanted` annotated images. Returns the file's content."""
    if not Path(images_dir).is_dir():
        raise SourceError(f"image directory {images_dir} not found. Fix: set data.coco.images "
                          "to your val2017 directory.")
    coco = read_annotation_file(Path(annotations))
    available = len(candidate_order(coco, 0))
    if available < wanted:
        raise SourceError(
            f"{annotations} has {available} annotated images, fewer than the {wanted} asked for "
            f"(data.coco.n_train + n_val + n_test). Fix: lower them to {available} in all.")
    return coco


def write_coco_subset(
    out_dir: Path,
    *,
    images_dir: Path,
    annotations: Path,
    seed: int,
    image_size: int,
    n_train: int,
    n_val: int,
    n_test: int,
    on_bad_sample: str,
    workers: int,
    max_pixels: int,
    allow_outside_paths: bool,
) -> dict[str, Any]:
    """Write the letterboxed subset as images/*.png and instances_{split}.json, atomically."""
    coco = check_source(images_dir, annotations, n_train + n_val + n_test)
    bad = dangling_annotations(coco, Path(annotations))
    entries = {entry["id"]: entry for entry in coco["images"]}
    annotations_of: dict[int, list[dict]] = {image_id: [] for image_id in entries}
    categories = {c["id"] for c in coco["categories"]}
    for a in coco["annotations"]:
        if a["image_id"] in entries and a["category_id"] in categories:
            annotations_of[a["image_id"]].append(a)
    order = candidate_order(coco, seed)
    split_sizes = {"train": n_train, "val": n_val, "test": n_test}
    wanted = sum(split_sizes.values())
    prepared: list[PreparedImage] = []
    skipped = apply_policy(bad, on_bad_sample)
    with atomic_dir(out_dir) as tmp:
        (tmp / "images").mkdir()
        position = 0
        # Under `skip`, each round replaces the bad samples of the last with the next images.
        while len(prepared) < wanted and position < len(order):
            batch = order[position : position + wanted - len(prepared)]
            position += len(batch)
            tasks = [ImageTask(entries[i], annotations_of[i], Path(images_dir), tmp, image_size,
                               max_pixels, allow_outside_paths)
                     for i in batch]
            for result in parallel_map(prepare_image, tasks, workers, desc="coco"):
                if isinstance(result, BadSample):
                    bad.append(result)
                else:
                    prepared.append(result)
            skipped = apply_policy(bad, on_bad_sample)
        if len(prepared) < wanted:
            raise SourceError(
                f"{annotations} has {len(prepared)} usable annotated images, fewer than the "
                f"{wanted} asked for (data.coco.n_train + n_val + n_test). Fix: lower them.")
        start = 0
        for split, n in split_sizes.items():
            chosen = prepared[start : start + n]
            start += n
            write_json(tmp / f"instances_{split}.json", {
                "images": [p.entry for p in chosen],
                "annotations": [a for p in chosen for a in p.annotations],
                "categories": coco["categories"],
            })
    return {
        "images": split_sizes,
        "objects": sum(len(p.annotations) for p in prepared),
        "dropped_tiny_annotations": sum(p.dropped for p in prepared),
        "skipped": skipped,
    }

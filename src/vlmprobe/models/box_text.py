"""Boxes in a model's text: the formats the families write when asked to ground an object.

A family names its format (`ModelAdapter.box_format`, a key of BOX_FORMATS). Text formats are
parsed here; the native formats (location tokens) are parsed by the family's own processor
post-processing, in its adapter's `parse_grounding`. Every parser ends in `usable_box`, so a
malformed answer is a miss, never a crash or a non-finite IoU.
"""

from __future__ import annotations

import json
import re

import numpy as np

BOX_FORMATS = {
    "0-1000": "[[x0,y0,x1,y1]] in thousandths of the image's width and height (CogVLM2, "
              "InternVL2 inside <box>...</box>)",
    "pixels-json": 'JSON with "bbox_2d": [x0, y0, x1, y1] in pixels, often fenced (Qwen2.5-VL)',
    "kosmos2-locations": "<phrase>...</phrase><object><patch_index_....>...</object> location "
                         "tokens on a 32x32 grid, parsed by Kosmos2Processor."
                         "post_process_generation (Kosmos-2)",
    "florence2-locations": "<loc_0>..<loc_999> location tokens, parsed by Florence2Processor."
                           "post_process_generation for the task (Florence-2)",
}
TEXT_FORMATS = ("0-1000", "pixels-json")  # parsed by `parse_box`; the others by a processor

_NUMBER = r"-?\d+(?:\.\d+)?"
_BRACKETED_BOX = re.compile(
    rf"\[\[\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*,\s*({_NUMBER})\s*\]"
)


def usable_box(box: np.ndarray | list[float] | None,
               image_size: tuple[int, int]) -> np.ndarray | None:
    """`box` (xyxy pixels) clipped to an `image_size` (H, W) image, or None where it is missing,
    non-finite or empty after clipping."""
    if box is None:
        return None
    box = np.asarray(box, dtype=float)
    if box.shape != (4,) or not np.isfinite(box).all():  # JSON admits NaN and Infinity
        return None
    h, w = image_size
    box = np.clip(box, 0, [w, h, w, h])
    if box[2] <= box[0] or box[3] <= box[1]:
        return None
    return box


def parse_box(text: str, box_format: str, image_size: tuple[int, int]) -> np.ndarray | None:
    """The first box in a model's answer as xyxy pixels, or None if there is none usable."""
    if box_format not in TEXT_FORMATS:
        native = f" ({box_format!r} is parsed by its family's processor: the adapter's " \
                 "parse_grounding)" if box_format in BOX_FORMATS else ""
        raise ValueError(f"unknown text box format {box_format!r}{native}; expected one of "
                         f"{', '.join(TEXT_FORMATS)}")
    h, w = image_size
    if box_format == "0-1000":
        match = _BRACKETED_BOX.search(text)
        if match is None:
            return None
        box = np.array([float(v) for v in match.groups()]) / 1000.0 * np.array([w, h, w, h])
    else:
        box = _json_bbox(text)
    return usable_box(box, image_size)


def _json_bbox(text: str) -> np.ndarray | None:
    start = min((i for i in (text.find("["), text.find("{")) if i >= 0), default=-1)
    if start < 0:
        return None
    try:
        data, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError:
        return None
    items = data if isinstance(data, list) else [data]
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("bbox_2d"), list):
            values = item["bbox_2d"]
            if len(values) == 4 and all(isinstance(v, int | float) for v in values):
                return np.array(values, dtype=float)
    return None

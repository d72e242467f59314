"""Small datasets in the formats of the real ones, built by the tests themselves.

`make_coco` writes a COCO-2017-val-shaped copy: <root>/val2017/*.jpg of mixed sizes and
<root>/annotations/instances_val2017.json with polygon instances, crowd RLE regions, sparse
category ids and a category no image uses. Objects never overlap, so boxes from the masks are
exact. `corrupt_coco` breaks one sample of it in one of the ways the data stage must catch.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 3, "name": "car", "supercategory": "vehicle"},
    {"id": 18, "name": "dog", "supercategory": "animal"},
    {"id": 90, "name": "toothbrush", "supercategory": "indoor"},  # in no image, as in subsets
]
USED_CATEGORY_IDS = (1, 3, 18)
SIZES = ((160, 120), (120, 160), (200, 150), (144, 144))  # (width, height), as COCO mixes them
COLOURS = ((220, 30, 30), (30, 200, 40), (40, 60, 230))
ANNOTATIONS = "annotations/instances_val2017.json"


def _polygon(category_id: int, x: float, y: float, w: float, h: float) -> list[float]:
    """A rectangle (person, car) or an ellipse (dog) as one COCO polygon, in pixel edges."""
    if category_id == 18:
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        xs, ys = x + w / 2 + w / 2 * np.cos(t), y + h / 2 + h / 2 * np.sin(t)
    else:
        xs, ys = np.array([x, x + w, x + w, x]), np.array([y, y, y + h, y + h])
    return np.stack([xs, ys], axis=1).ravel().round(2).tolist()


def make_coco(root: Path, n_images: int = 48, seed: int = 0) -> Path:
    """Write the fixture under `root`; return `root`."""
    rng = np.random.default_rng(seed)
    (root / "val2017").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(n_images):
        image_id = 1000 + 7 * index  # sparse ids, as COCO's
        width, height = SIZES[index % len(SIZES)]
        canvas = np.full((height, width, 3), rng.integers(0, 80, 3), dtype=np.uint8)
        # Objects in the cells of a 2x2 grid, so they never overlap.
        cells = rng.permutation(4)[: int(rng.integers(1, 4))]
        for cell in cells:
            cw, ch = width / 2, height / 2
            w, h = rng.uniform(0.45, 0.85) * cw, rng.uniform(0.45, 0.85) * ch
            x = (cell % 2) * cw + rng.uniform(0, cw - w)
            y = (cell // 2) * ch + rng.uniform(0, ch - h)
            category_id = int(rng.choice(USED_CATEGORY_IDS))
            polygon = _polygon(category_id, x, y, w, h)
            rle = mask_utils.merge(mask_utils.frPyObjects([polygon], height, width))
            mask = mask_utils.decode(rle).astype(bool)
            canvas[mask] = COLOURS[USED_CATEGORY_IDS.index(category_id)]
            bx, by, bw, bh = mask_utils.toBbox(rle).tolist()
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                "segmentation": [polygon], "area": float(mask.sum()),
                "bbox": [bx, by, bw, bh], "iscrowd": 0,
            })
        if index % 5 == 0:  # a crowd region in the background strip, as uncompressed RLE
            crowd = np.zeros((height, width), dtype=np.uint8)
            crowd[: height // 10, : width // 4] = 1
            counts = _uncompressed_counts(crowd)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                "segmentation": {"size": [height, width], "counts": counts},
                "area": float(crowd.sum()), "bbox": [0.0, 0.0, width / 4, height // 10],
                "iscrowd": 1,
            })
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(canvas).save(root / "val2017" / file_name, quality=95)
        images.append({"id": image_id, "file_name": file_name, "width": width,
                       "height": height})
    (root / "annotations").mkdir(exist_ok=True)
    (root / ANNOTATIONS).write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return root


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE: run lengths over the column-major pixels, starting with 0s."""
    flat = mask.ravel(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    return [0, *counts] if flat[0] else counts


def corrupt_coco(root: Path, image_id: int, kind: str) -> str:
    """Break image `image_id`'s sample; return text the error message must contain."""
    coco = json.loads((root / ANNOTATIONS).read_text())
    entry = next(e for e in coco["images"] if e["id"] == image_id)
    path = root / "val2017" / entry["file_name"]
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return f"{path}: unreadable image"
    if kind == "missing":
        path.unlink()
        return f"{path}: file not found"
    if kind == "not_an_image":
        path.write_bytes(b"this is not a jpeg")
        return f"{path}: unreadable image"
    if kind == "box_outside":
        annotation = next(a for a in coco["annotations"] if a["image_id"] == image_id)
        annotation["bbox"][0] = entry["width"] + 5.0
        (root / ANNOTATIONS).write_text(json.dumps(coco))
        return f"{path}: annotation {annotation['id']}: bbox"
    if kind == "dangling":
        coco["annotations"].append({**coco["annotations"][0], "id": 99999, "image_id": 424242})
        (root / ANNOTATIONS).write_text(json.dumps(coco))
        return "annotation 99999 points at image_id 424242"
    if kind == "fifo":
        path.unlink()
        os.mkfifo(path)
        return f"{path}: is a FIFO, not an image file"
    if kind == "bomb":
        path.write_bytes(png_header(12000, 12000))
        return f"{path}: refused before decoding: its header says over 80,000,000 pixels"
    if kind.startswith("outside_"):
        outside = root / "outside.jpg"  # beside val2017/, not in it
        path.rename(outside)
        if kind == "outside_symlink":
            path.symlink_to(outside)
        else:
            entry["file_name"] = "../outside.jpg" if kind == "outside_dotdot" else str(outside)
            (root / ANNOTATIONS).write_text(json.dumps(coco))
        return "leads outside the image directory"
    raise ValueError(f"unknown corruption {kind!r}")


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height (an RGB image) in its header and holds one empty row: a
    decompression bomb's header in a few bytes (a real one is ~140 KB for 12000x12000)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * (1 + 3 * width))) + chunk(b"IEND", b""))


# SSv2: (template, on-screen motion (dx, dy) per frame or None for none).
SSV2_TEMPLATES = (
    ("Pushing [something] from left to right", (1, 0)),
    ("Pushing [something] from right to left", (-1, 0)),
    ("Moving [something] up", (0, -1)),
    ("Moving [something] down", (0, 1)),
    ("Holding [something]", None),  # not directional: the data stage leaves it out
)
SSV2_LABELS = "labels/validation.json"
SSV2_VIDEOS = "20bn-something-something-v2"
SSV2_SIZE = (96, 72)  # (width, height): letterboxed by the data stage
SSV2_FPS = 12


def encode_video(path: Path, frames: np.ndarray, fps: int = SSV2_FPS) -> None:
    """(T, H, W, 3) uint8 frames as a VP9 webm, as SSv2 ships its videos."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def make_ssv2(root: Path, n_videos: int = 40, n_frames: int = 16, seed: int = 0) -> Path:
    """<root>/20bn-something-something-v2/<id>.webm (a square moving on a plain background) and
    <root>/labels/validation.json with SSv2's fields; every fifth video's template is not
    directional."""
    rng = np.random.default_rng(seed)
    (root / SSV2_VIDEOS).mkdir(parents=True, exist_ok=True)
    width, height = SSV2_SIZE
    labels = []
    for index in range(n_videos):
        video_id = str(50000 + 3 * index)
        template, step = SSV2_TEMPLATES[index % len(SSV2_TEMPLATES)]
        side, speed = 16, 3
        dx, dy = step or (0, 0)
        x0 = int(rng.integers(0, width - side - abs(dx) * speed * (n_frames - 1) + 1))
        y0 = int(rng.integers(0, height - side - abs(dy) * speed * (n_frames - 1) + 1))
        x0 += (width - side - 2 * x0) * (dx < 0)  # leftward starts on the right
        y0 += (height - side - 2 * y0) * (dy < 0)
        frames = np.empty((n_frames, height, width, 3), np.uint8)
        frames[:] = rng.integers(0, 100, 3)
        for t in range(n_frames):
            x, y = x0 + dx * speed * t, y0 + dy * speed * t
            frames[t, y : y + side, x : x + side] = (230, 200, 40)
        encode_video(root / SSV2_VIDEOS / f"{video_id}.webm", frames)
        labels.append({"id": video_id, "label": template.replace("[", "").replace("]", ""),
                       "template": template, "placeholders": ["something"]})
    (root / "labels").mkdir(exist_ok=True)
    (root / SSV2_LABELS).write_text(json.dumps(labels))
    return root


def corrupt_video(root: Path, video_id: str, kind: str) -> str:
    """Break one video; return text the error message must contain."""
    path = root / SSV2_VIDEOS / f"{video_id}.webm"
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return f"{path}: unreadable video"
    if kind == "missing":
        path.unlink()
        return f"{path}: file not found"
    if kind == "not_a_video":
        path.write_bytes(b"this is not a webm")
        return f"{path}: unreadable video"
    raise ValueError(f"unknown corruption {kind!r}")

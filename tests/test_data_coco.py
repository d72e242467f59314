"""COCO-format source: letterbox geometry, the deterministic subset, bad-sample policies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from fixture_datasets import ANNOTATIONS, CATEGORIES, corrupt_coco, make_coco
from vlmprobe.data.bad_samples import BadSampleError
from vlmprobe.data.coco import candidate_order, output_mask, write_coco_subset
from vlmprobe.data.dataset import SPLITS, load_split
from vlmprobe.data.letterbox import PAD_RGB, Letterbox

SUBSET = dict(seed=0, image_size=112, n_train=10, n_val=4, n_test=4, workers=2)


@pytest.mark.parametrize(("width", "height"), [(160, 120), (120, 160), (100, 100), (640, 427)])
def test_letterbox_keeps_aspect_and_centres(width, height):
    box = Letterbox(width, height, 224)
    new_w, new_h = box.new_size
    assert max(new_w, new_h) == 224
    assert abs(new_w / new_h - width / height) < 2 / min(new_w, new_h)
    ox, oy = box.offset
    assert ox + new_w + ox in (224, 223) and oy + new_h + oy in (224, 223)
    # The image's corners land on the scaled image's corners.
    corners = box.points([[0, 0], [width, height]])
    assert np.allclose(corners, [[ox, oy], [ox + new_w, oy + new_h]], rtol=0, atol=1e-9)


def test_letterbox_pads_and_moves_boxes_masks_and_pixels_together():
    box = Letterbox(100, 50, 200)  # scale exactly 2, offset (0, 50)
    assert box.scale == (2.0, 2.0) and box.offset == (0, 50)
    source = np.zeros((50, 100, 3), np.uint8)
    source[10:20, 30:60] = 255
    out = box.image(Image.fromarray(source))
    assert (out[:50] == PAD_RGB).all() and (out[150:] == PAD_RGB).all()
    assert box.box([30, 10, 30, 10]) == [60, 70, 60, 20]
    rows, cols = np.nonzero(out[..., 0] > 128)
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (60, 70, 120, 90)
    # A polygon is rasterised at the output: its mask's extent is exactly the moved box ...
    polygon = [[30, 10, 60, 10, 60, 20, 30, 20]]
    mask = output_mask(polygon, box)
    assert mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
                             ).tolist() == [60, 70, 60, 20]
    # ... and an RLE mask, resampled, covers the same pixels.
    rle = mask_utils.encode(np.asfortranarray((source[..., 0] > 0).astype(np.uint8)))
    assert (output_mask(rle, box) == mask).all()


@pytest.fixture(scope="module")
def coco_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_coco(tmp_path_factory.mktemp("coco"))


def _write(source: Path, out: Path, policy: str = "fail") -> dict:
    return write_coco_subset(out, images_dir=source / "val2017",
                             annotations=source / ANNOTATIONS, on_bad_sample=policy, **SUBSET)


def test_subset_is_deterministic_coco_format_with_categories_and_crowds(coco_source, tmp_path):
    summary = _write(coco_source, tmp_path / "a")
    _write(coco_source, tmp_path / "b")
    for name in [*(f"instances_{s}.json" for s in SPLITS), "images"]:
        a, b = tmp_path / "a" / name, tmp_path / "b" / name
        files = sorted(a.iterdir()) if a.is_dir() else [a]
        assert all(f.read_bytes() == (b / f.relative_to(a)).read_bytes() for f in files)
    assert summary["images"] == {"train": 10, "val": 4, "test": 4}
    assert summary["skipped"] == {"count": 0, "samples": []}
    ids = [json.loads((tmp_path / "a" / f"instances_{s}.json").read_text())["images"]
           for s in SPLITS]
    chosen = [e["id"] for split in ids for e in split]
    assert chosen == candidate_order(json.loads((coco_source / ANNOTATIONS).read_text()), 0)[:18]
    crowds = 0
    for split in SPLITS:
        gt = COCO(str(tmp_path / "a" / f"instances_{split}.json"))
        assert gt.loadCats(gt.getCatIds()) == CATEGORIES
        for a in gt.dataset["annotations"]:
            x, y, w, h = a["bbox"]
            assert 0 <= x and 0 <= y and x + w <= 112 and y + h <= 112
            # Non-overlapping fixture objects: the box is the mask's extent, within a pixel.
            if not a["iscrowd"]:
                extent = mask_utils.toBbox(a["segmentation"])
                assert np.abs(extent - a["bbox"]).max() <= 1.0
        crowds += sum(a["iscrowd"] for a in gt.dataset["annotations"])
        loaded = load_split(tmp_path / "a", split)
        assert loaded.images.shape[1:] == (112, 112, 3)
        assert sum(len(b) for b in loaded.boxes) == len(gt.dataset["annotations"]) - sum(
            a["iscrowd"] for a in gt.dataset["annotations"])  # crowds are not instances
    assert crowds > 0


@pytest.mark.parametrize("kind", ["truncated", "missing", "not_an_image", "box_outside",
                                  "dangling"])
def test_bad_sample_fails_naming_file_or_is_skipped_and_recorded(tmp_path, kind):
    source = make_coco(tmp_path / "coco", n_images=24)
    victim = candidate_order(json.loads((source / ANNOTATIONS).read_text()), 0)[0]
    expected = corrupt_coco(source, victim, kind)
    out = tmp_path / "out" / "images"
    with pytest.raises(BadSampleError, match="data.on_bad_sample=skip") as failure:
        _write(source, out)
    assert expected in str(failure.value)
    assert not out.exists()  # nothing half-written: no scratch directory left beside it
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []

    summary = _write(source, out, policy="skip")
    assert summary["skipped"]["count"] == 1 and expected in summary["skipped"]["samples"][0]
    assert summary["images"] == {"train": 10, "val": 4, "test": 4}  # the next image took its place
    chosen = {e["id"] for s in SPLITS
              for e in json.loads((out / f"instances_{s}.json").read_text())["images"]}
    assert (victim in chosen) is (kind == "dangling")

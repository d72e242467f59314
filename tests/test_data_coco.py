"""COCO-format source: letterbox geometry, the deterministic subset, bad-sample policies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from conftest import ROOT, run, set_params, stage_command
from fixture_datasets import ANNOTATIONS, CATEGORIES, corrupt_coco, make_coco, png_header
from vlmprobe.data.bad_samples import POLICIES, BadSample, BadSampleError
from vlmprobe.data.coco import (
    ImageTask,
    SourceError,
    candidate_order,
    output_mask,
    prepare_image,
    write_coco_subset,
)
from vlmprobe.data.dataset import SPLITS, load_split
from vlmprobe.data.letterbox import PAD_RGB, Letterbox

SUBSET = dict(seed=0, image_size=112, n_train=10, n_val=4, n_test=4, workers=2,
              max_pixels=40_000_000)


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


def _write(source: Path, out: Path, policy: str = "fail", allow_outside_paths: bool = False
           ) -> dict:
    return write_coco_subset(out, images_dir=source / "val2017",
                             annotations=source / ANNOTATIONS, on_bad_sample=policy,
                             allow_outside_paths=allow_outside_paths, **SUBSET)


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
                                  "dangling", "fifo", "bomb", "outside_dotdot",
                                  "outside_absolute", "outside_symlink"])
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


@pytest.mark.parametrize("kind", ["outside_dotdot", "outside_absolute", "outside_symlink"])
def test_paths_outside_the_image_directory_are_read_when_allowed(tmp_path, kind):
    source = make_coco(tmp_path / "coco", n_images=24)
    victim = candidate_order(json.loads((source / ANNOTATIONS).read_text()), 0)[0]
    corrupt_coco(source, victim, kind)
    summary = _write(source, tmp_path / "out", allow_outside_paths=True)
    assert summary["skipped"]["count"] == 0
    chosen = {e["id"] for e in json.loads((tmp_path / "out/instances_train.json").read_text())[
        "images"]}
    assert victim in chosen


# (mutation of the fixture's annotation file, fragment the error must contain). The fixture's
# first annotation has id 1; its first image has id 1000.
MALFORMED = [
    (lambda c: c["annotations"][0].update(bbox=["1", "2", "3", "4"]),
     "annotations[0] (id 1): `bbox` = ['1', '2', '3', '4'] must be 4 numbers"),
    (lambda c: c["annotations"][0].update(bbox=[1, 2, 3]), "`bbox` = [1, 2, 3] must be 4"),
    (lambda c: c["annotations"][0].update(bbox=[1, 2, float("nan"), 4]), "`bbox` = [1, 2, nan"),
    (lambda c: c["annotations"][0].pop("id"), "annotations[0] has no `id`"),
    (lambda c: c["annotations"][0].pop("image_id"), "annotations[0] (id 1) has no `image_id`"),
    (lambda c: c["annotations"][0].update(category_id="1"), "`category_id` = '1' must be an"),
    (lambda c: c["annotations"][0].update(segmentation="x"), "`segmentation` = 'x' must be"),
    (lambda c: c["annotations"][0].update(segmentation=[["a", 1]]), "`segmentation` = [['a'"),
    (lambda c: c["annotations"][0].update(iscrowd=2), "`iscrowd` = 2 must be 0 or 1"),
    (lambda c: c["annotations"].__setitem__(0, [1, 2]), "annotations[0] is a list, expected"),
    (lambda c: c["images"][0].update(id="1000"), "images[0]: `id` = '1000' must be an integer"),
    (lambda c: c["images"][0].update(width=-5), "images[0] (id 1000): `width` = -5 must be a "
                                                "positive integer"),
    (lambda c: c["images"][0].pop("file_name"), "images[0] (id 1000) has no `file_name`"),
    (lambda c: c.update(images={str(e["id"]): e for e in c["images"]}),
     "`images` is a dict, expected a list of objects"),
    (lambda c: c.update(categories="person"), "`categories` is a str, expected a list"),
    (lambda c: c["categories"][0].update(name=None), "categories[0] (id 1): `name` = None must"),
    (lambda c: c["images"][1].update(id=c["images"][0]["id"]),
     "images: id 1000 is used 2 times (images[0], images[1]); ids must be unique"),
    (lambda c: c["annotations"][1].update(id=c["annotations"][0]["id"]),
     "annotations: id 1 is used 2 times (annotations[0], annotations[1])"),
    (lambda c: c["categories"][1].update(id=1), "categories: id 1 is used 2 times"),
]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(("mutate", "expected"), MALFORMED,
                         ids=[expected for _, expected in MALFORMED])
def test_malformed_annotation_file_is_an_error_naming_the_field(tmp_path, mutate, expected,
                                                               policy):
    source = make_coco(tmp_path / "coco", n_images=24)
    coco = json.loads((source / ANNOTATIONS).read_text())
    mutate(coco)
    (source / ANNOTATIONS).write_text(json.dumps(coco))
    with pytest.raises(SourceError) as failure:
        _write(source, tmp_path / "out", policy=policy)
    message = str(failure.value)
    assert message.startswith(f"annotation file {source / ANNOTATIONS} is malformed")
    assert expected in message and "Fix: correct those fields" in message
    assert not (tmp_path / "out").exists()


def test_data_stage_reports_a_malformed_file_without_a_traceback(tmp_path):
    source = make_coco(tmp_path / "coco", n_images=24)
    coco = json.loads((source / ANNOTATIONS).read_text())
    coco["annotations"][0]["bbox"] = ["1", "2", "3", "4"]
    (source / ANNOTATIONS).write_text(json.dumps(coco))
    project = tmp_path / "p"
    project.mkdir()
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    set_params(project / "params.yaml", {
        "data.dataset": "coco", "data.coco.images": str(source / "val2017"),
        "data.coco.annotations": str(source / ANNOTATIONS), "data.coco.n_train": 4,
        "data.coco.n_val": 2, "data.coco.n_test": 2})
    result = run(stage_command("data"), project, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "`bbox` = ['1', '2', '3', '4'] must be 4 numbers" in result.stderr


@pytest.mark.parametrize(("width", "height", "says"), [
    (300, 300, "300x300 = 90,000 pixels"),  # PIL's own guard only warns up to twice its limit
    (400, 400, "over 100,000 pixels"),  # PIL's guard refuses in `open`, from the header
])
def test_too_many_pixels_are_refused_from_the_header(tmp_path, width, height, says):
    path = tmp_path / "big.png"
    path.write_bytes(png_header(width, height))  # a header and one row: decoding would fail
    entry = {"id": 1, "file_name": path.name, "width": width, "height": height}
    task = ImageTask(entry, [], tmp_path, tmp_path, 112, max_pixels=50_000,
                     allow_outside_paths=False)
    result = prepare_image(task)
    assert isinstance(result, BadSample)
    assert f"refused before decoding: its header says {says}, more than data.max_pixels = " \
           "50,000" in result.problem

"""Synthetic datasets: determinism, COCO validity, clean labels, motion labels, loaders, params."""

from __future__ import annotations

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import copy
import itertools
from pathlib import Path

import numpy as np
import pytest
import yaml
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from conftest import stage_args
from vlmprobe.data.dataset import SPLITS, DatasetError, load_all_images, load_split
from vlmprobe.data.moving_shapes import DIRECTIONS, generate_moving_shapes
from vlmprobe.data.shapes import MARGIN, generate_shapes
from vlmprobe.errors import stage_main
from vlmprobe.io import read_json
from vlmprobe.params import ParamsError
from vlmprobe.stages import data as data_stage

SHAPES = dict(
    image_size=96,
    n_train=12,
    n_val=4,
    n_test=4,
    min_objects=1,
    max_objects=4,
    min_size=12,
    max_size=30,
)
MOVING = dict(image_size=64, n_train=16, n_val=8, n_test=8, n_frames=4, speed=3)
PARAMS = {
    "data": {
        "dataset": "shapes",
        "seed": 0,
        "image_size": 64,
        "on_bad_sample": "fail",
        "workers": 0,
        "max_pixels": 40_000_000,
        "shapes": {k: v for k, v in SHAPES.items() if k != "image_size"},
        "moving_shapes": {k: v for k, v in MOVING.items() if k != "image_size"},
    }
}


@pytest.fixture(scope="module")
def shapes_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The dataset generated twice with seed 0 and once with seed 1."""
    root = tmp_path_factory.mktemp("shapes")
    dirs = {"a": root / "a", "b": root / "b", "other_seed": root / "c"}
    for name, out in dirs.items():
        generate_shapes(out, seed=1 if name == "other_seed" else 0, **SHAPES)
    return dirs


@pytest.fixture(scope="module")
def shapes_root(shapes_dirs: dict[str, Path]) -> Path:
    return shapes_dirs["a"]


@pytest.fixture(scope="module")
def moving_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moving")
    dirs = {"a": root / "a", "b": root / "b", "other_seed": root / "c"}
    for name, out in dirs.items():
        generate_moving_shapes(out, seed=1 if name == "other_seed" else 0, **MOVING)
    return dirs


def _coco(root: Path, split: str) -> COCO:
    return COCO(str(root / f"instances_{split}.json"))


def _all_annotations(root: Path) -> list[dict]:
    return [
        a for split in SPLITS for a in read_json(root / f"instances_{split}.json")["annotations"]
    ]


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _clips(root: Path) -> tuple[dict[str, np.ndarray], dict]:
    with np.load(root / "clips.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    return arrays, read_json(root / "clips.json")


# --- shapes ---------------------------------------------------------------------------------


def test_shapes_same_seed_gives_byte_identical_files(shapes_dirs):
    first, second = _files(shapes_dirs["a"]), _files(shapes_dirs["b"])
    assert len(first) == sum(SHAPES[f"n_{s}"] for s in SPLITS) + len(SPLITS)
    assert first == second


def test_shapes_other_seed_differs(shapes_dirs):
    first, other = _files(shapes_dirs["a"]), _files(shapes_dirs["other_seed"])
    assert first["instances_train.json"] != other["instances_train.json"]
    assert first["images/000001.png"] != other["images/000001.png"]


def test_pycocotools_loads_each_split_with_fixed_ids(shapes_root):
    next_id = 1
    for split in SPLITS:
        coco = _coco(shapes_root, split)
        ids = sorted(coco.getImgIds())
        assert len(ids) == SHAPES[f"n_{split}"]
        assert ids == list(range(next_id, next_id + len(ids)))  # train, then val, then test
        next_id += len(ids)
        assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {
            "circle",
            "square",
            "triangle",
        }
        for info in coco.loadImgs(ids):
            assert (shapes_root / info["file_name"]).is_file()
            assert info["file_name"] == f"images/{info['id']:06d}.png"


def test_boxes_and_areas_match_decoded_masks(shapes_root):
    coco = _coco(shapes_root, "train")
    for annotation in coco.loadAnns(coco.getAnnIds()):
        mask = coco.annToMask(annotation).astype(bool)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        x, y, w, h = annotation["bbox"]
        assert (x, y, x + w - 1, y + h - 1) == (cols[0], rows[0], cols[-1], rows[-1])
        assert annotation["area"] == mask.sum()
        assert SHAPES["min_size"] <= w <= SHAPES["max_size"] and w == h


def test_objects_do_not_overlap_and_keep_a_margin(shapes_root):
    for split in SPLITS:
        coco = _coco(shapes_root, split)
        for image_id in coco.getImgIds():
            annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            for a, b in itertools.combinations(annotations, 2):
                assert not (coco.annToMask(a) & coco.annToMask(b)).any()
                ax, ay, aw, ah = a["bbox"]
                bx, by, bw, bh = b["bbox"]
                gap = max(bx - (ax + aw), ax - (bx + bw), by - (ay + ah), ay - (by + bh))
                assert gap >= MARGIN


def test_object_pixels_have_the_object_colour(shapes_root):
    split = load_split(shapes_root, "train")
    for image, masks in zip(split.images, split.masks, strict=True):
        for mask in masks:
            assert len(np.unique(image[mask], axis=0)) == 1
            assert not (image[mask][0] == image[~masks.any(axis=0)][0]).all()


def test_one_to_four_objects_per_image_and_balanced_classes(shapes_root):
    annotations = _all_annotations(shapes_root)
    per_image = np.bincount([a["image_id"] for a in annotations])[1:]
    assert len(per_image) == sum(SHAPES[f"n_{s}"] for s in SPLITS)
    assert per_image.min() >= 1 and per_image.max() <= 4
    counts = np.bincount([a["category_id"] for a in annotations], minlength=4)[1:]
    assert (counts / counts.sum() > 0.2).all(), counts
    assert len({a["id"] for a in annotations}) == len(annotations)


def test_load_split_round_trips_the_annotations(shapes_root):
    split = load_split(shapes_root, "val")
    coco = _coco(shapes_root, "val")
    assert split.image_ids == [img["id"] for img in read_json(split.coco_path)["images"]]
    assert split.images.shape == (SHAPES["n_val"], 96, 96, 3) and split.images.dtype == np.uint8
    assert [c["name"] for c in split.categories] == ["circle", "square", "triangle"]
    for image_id, boxes, labels, masks in zip(
        split.image_ids, split.boxes, split.labels, split.masks, strict=True
    ):
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        assert boxes.shape == (len(annotations), 4) and masks.shape == (len(annotations), 96, 96)
        for annotation, box, label, mask in zip(annotations, boxes, labels, masks, strict=True):
            x, y, w, h = annotation["bbox"]
            np.testing.assert_array_equal(box, [x, y, x + w, y + h])
            assert label == annotation["category_id"]
            np.testing.assert_array_equal(mask, mask_utils.decode(annotation["segmentation"]))


def test_load_all_images_covers_every_split_in_id_order(shapes_root):
    ids, images = load_all_images(shapes_root)
    assert ids == list(range(1, sum(SHAPES[f"n_{s}"] for s in SPLITS) + 1))
    test_split = load_split(shapes_root, "test")
    np.testing.assert_array_equal(images[-SHAPES["n_test"] :], test_split.images)


def test_missing_dataset_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(DatasetError, match=r"instances_train\.json.*dvc repro data"):
        load_split(tmp_path, "train")
    with pytest.raises(DatasetError, match="dvc repro data"):
        load_all_images(tmp_path)


# --- moving shapes --------------------------------------------------------------------------


def test_moving_shapes_are_deterministic(moving_dirs):
    assert _files(moving_dirs["a"]) == _files(moving_dirs["b"])
    first, _ = _clips(moving_dirs["a"])
    other, _ = _clips(moving_dirs["other_seed"])
    assert not np.array_equal(first["frames"], other["frames"])


def test_moving_shapes_layout_and_balanced_directions(moving_dirs):
    arrays, meta = _clips(moving_dirs["a"])
    n_clips = sum(MOVING[f"n_{s}"] for s in SPLITS)
    size = MOVING["image_size"]
    assert arrays["frames"].shape == (n_clips, MOVING["n_frames"], size, size, 3)
    assert arrays["frames"].dtype == np.uint8
    assert arrays["direction"].dtype == np.int64 and arrays["clip_id"].dtype == np.int64
    assert meta["directions"] == list(DIRECTIONS)
    assert sorted(i for ids in meta["splits"].values() for i in ids) == list(range(n_clips))
    for split in SPLITS:
        directions = arrays["direction"][meta["splits"][split]]
        assert set(directions.tolist()) == set(range(len(DIRECTIONS)))


def test_moving_object_follows_its_direction_inside_the_frame(moving_dirs):
    arrays, meta = _clips(moving_dirs["a"])
    size = MOVING["image_size"]
    for direction, boxes in zip(arrays["direction"], meta["boxes"], strict=True):
        boxes = np.array(boxes)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] + boxes[:, 2:] <= size).all()
        centres = boxes[:, :2] + boxes[:, 2:] / 2
        dx, dy = centres[-1] - centres[0]
        travel = MOVING["speed"] * (MOVING["n_frames"] - 1)
        assert np.hypot(dx, dy) == pytest.approx(travel, abs=1.5)
        angle = np.degrees(np.arctan2(-dy, dx))  # image y points down
        error = (angle - 45 * direction + 180) % 360 - 180
        assert abs(error) < 15, (direction, dx, dy)


def test_moving_boxes_match_the_pixels(moving_dirs):
    arrays, meta = _clips(moving_dirs["a"])
    for frames, boxes, distractor in zip(
        arrays["frames"], meta["boxes"], meta["distractor_boxes"], strict=True
    ):
        for frame, (x, y, w, h) in zip(frames, boxes, strict=True):
            colour = frame[y + h // 2, x + w // 2]
            same_colour = (frame == colour).all(axis=-1)
            if distractor is not None:
                dx, dy, dw, dh = distractor
                assert (x + w <= dx or dx + dw <= x) or (y + h <= dy or dy + dh <= y)
                same_colour[dy : dy + dh, dx : dx + dw] = False
            rows = np.flatnonzero(same_colour.any(axis=1))
            cols = np.flatnonzero(same_colour.any(axis=0))
            assert [cols[0], rows[0], cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1] == [
                x,
                y,
                w,
                h,
            ]


# --- stage and params -----------------------------------------------------------------------


def _with(**changes: object) -> dict:
    """PARAMS with dotted keys under `data` replaced, e.g. _with(**{"shapes.n_train": 0})."""
    params = copy.deepcopy(PARAMS)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = params["data"]
        for part in parents:
            node = node[part]
        node[leaf] = value
    return params


def test_valid_params_pass():
    config = data_stage.validate(PARAMS)
    shapes, moving = config["shapes"], config["moving_shapes"]
    assert shapes["max_size"] == SHAPES["max_size"] and moving["speed"] == MOVING["speed"]


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"shapes.min_size": 40, "shapes.max_size": 30}, "data.shapes.max_size"),
        ({"shapes.n_train": 0}, "data.shapes.n_train"),
        ({"moving_shapes.n_test": 0}, "data.moving_shapes.n_test"),
        ({"shapes.max_size": 65}, "data.shapes.max_size"),
        ({"shapes.min_objects": 3, "shapes.max_objects": 2}, "data.shapes.max_objects"),
        ({"image_size": 16}, "data.image_size"),
        ({"moving_shapes.n_frames": 1}, "data.moving_shapes.n_frames"),
        ({"moving_shapes.n_frames": 65}, "data.moving_shapes.n_frames"),
        ({"moving_shapes.speed": 30}, "data.moving_shapes.speed"),
        ({"moving_shapes.speed": 0}, "data.moving_shapes.speed"),
        ({"seed": "zero"}, "data.seed"),
        ({"max_pixels": 0}, "data.max_pixels"),
    ],
)
def test_bad_params_name_the_key(changes, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        data_stage.validate(_with(**changes))


def test_stage_rejects_bad_params_before_writing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(_with(**{"shapes.n_train": 0})))
    assert stage_main(lambda: data_stage.main(stage_args("data"))) == 1
    assert re.match(r"^error: .*data\.shapes\.n_train", capsys.readouterr().err)
    assert not Path("data").exists() and not Path("metrics").exists()


def test_stage_writes_both_datasets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(PARAMS))
    data_stage.main(stage_args("data"))
    assert load_split(Path("data/images"), "test").images.shape[0] == SHAPES["n_test"]
    assert (Path("data/clips") / "clips.npz").is_file()

"""The realistic COCO-format set (tests/realistic_coco.py) has what it claims, for two seeds and
two image scales, and goes through the data stage's COCO path (letterboxed to 448 px) whole."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from scipy import ndimage

from realistic_coco import ANNOTATIONS, CATEGORIES, SMALL_SIDE, make_realistic_coco
from vlmprobe.data.coco import write_coco_subset
from vlmprobe.data.dataset import load_split

N_IMAGES = 30


@pytest.fixture(scope="module", params=[(0, 1.0), (1, 0.5)], ids=["seed0-full", "seed1-half"])
def realistic(request, tmp_path_factory):
    seed, scale = request.param
    root = make_realistic_coco(tmp_path_factory.mktemp("realistic"), N_IMAGES, seed, scale)
    return root, json.loads((root / ANNOTATIONS).read_text()), scale, seed


def masks_by_image(coco: dict) -> dict[int, list[tuple[int, np.ndarray]]]:
    out: dict[int, list[tuple[int, np.ndarray]]] = {e["id"]: [] for e in coco["images"]}
    for a in coco["annotations"]:
        rle = {**a["segmentation"], "counts": a["segmentation"]["counts"].encode()}
        out[a["image_id"]].append((a["category_id"], mask_utils.decode(rle).astype(bool)))
    return out


def test_annotations_are_the_visible_masks_with_their_boxes(realistic):
    _, coco, _, _ = realistic
    for a in coco["annotations"][:200]:
        rle = {**a["segmentation"], "counts": a["segmentation"]["counts"].encode()}
        mask = mask_utils.decode(rle).astype(bool)
        ys, xs = np.nonzero(mask)
        assert a["area"] == mask.sum() and a["iscrowd"] == 0
        np.testing.assert_allclose(a["bbox"], [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1])


def test_it_is_hard_in_the_ways_real_coco_is(realistic):
    _, coco, scale, _ = realistic
    sizes = {(e["width"], e["height"]) for e in coco["images"]}
    assert len({w / h for w, h in sizes}) >= 4 and max(max(s) for s in sizes) >= 400 * scale
    per_image = masks_by_image(coco)
    counts = [len(v) for v in per_image.values()]
    assert np.mean(counts) >= 5 and max(counts) >= 10  # several to many instances
    used = {a["category_id"] for a in coco["annotations"]}
    assert len(used) == len(CATEGORIES) == 12 and np.diff(sorted(used)).min() > 1  # sparse ids
    small = [a["area"] < (SMALL_SIDE * scale) ** 2 for a in coco["annotations"]]
    assert np.mean(small) >= 0.15  # COCO's "small" objects, at this scale
    touching = occluded = 0
    for instances in per_image.values():
        grown = [(c, ndimage.binary_dilation(m, iterations=2)) for c, m in instances]
        touching += sum(c1 == c2 and (g1 & m2).any()
                        for i, (c1, g1) in enumerate(grown)
                        for c2, m2 in (pair for j, pair in enumerate(instances) if j > i))
        occluded += sum(
            ndimage.binary_fill_holes(m).sum() > m.sum() for _, m in instances)  # holes
    assert touching >= N_IMAGES // 3  # same-class instances that touch or overlap
    assert occluded >= N_IMAGES // 3  # hollow shapes, and shapes cut by a later instance


def test_it_is_deterministic_in_its_seed(realistic, tmp_path):
    root, _, scale, seed = realistic
    again = make_realistic_coco(tmp_path / "again", 3, seed=seed, scale=scale)
    first = sorted((root / "val2017").iterdir())[:3]
    assert [p.read_bytes() for p in first] == [
        p.read_bytes() for p in sorted((again / "val2017").iterdir())]


def test_the_data_stages_coco_path_reads_it_whole(realistic, tmp_path):
    root, _, _, _ = realistic
    summary = write_coco_subset(
        tmp_path / "images", images_dir=root / "val2017", annotations=root / ANNOTATIONS,
        seed=0, image_size=448, n_train=20, n_val=4, n_test=6, on_bad_sample="fail", workers=0,
        max_pixels=40_000_000, allow_outside_paths=False)
    assert summary["skipped"]["count"] == 0
    assert summary["images"] == {"train": 20, "val": 4, "test": 6}
    split = load_split(tmp_path / "images", "train")
    assert split.images.shape[1:] == (448, 448, 3)
    assert sum(len(b) for b in split.boxes) >= 5 * 20

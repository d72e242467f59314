"""mAP through pycocotools on hand-made detections with known AP; the bootstrap's accumulation
against pycocotools' own."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vlmprobe.metrics.coco_map import (
    average_precision,
    class_matches,
    coco_map,
    coco_map_ci,
    evaluate,
    load_coco,
)


def _gt_file(tmp_path: Path, boxes_per_image: dict[int, list[tuple[int, list[float]]]]) -> Path:
    images, annotations = [], []
    for image_id, objects in boxes_per_image.items():
        images.append({"id": image_id, "width": 100, "height": 100, "file_name": f"{image_id}.png"})
        for category, (x, y, w, h) in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
            })
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": categories}))
    return path


def _det(image_id: int, category: int, bbox: list[float], score: float) -> dict:
    return {"image_id": image_id, "category_id": category, "bbox": bbox, "score": score}


def test_coco_map_hand_made_detections_with_known_ap(tmp_path):
    gt = load_coco(_gt_file(tmp_path, {1: [(1, [10, 10, 20, 20]), (1, [50, 50, 30, 30])]}))
    detections = [
        _det(1, 1, [10, 10, 20, 20], 0.9),  # TP: precision 1 at recall 0.5
        _det(1, 1, [70, 0, 20, 20], 0.8),  # FP: precision 1/2 at recall 0.5
        _det(1, 1, [50, 50, 30, 30], 0.7),  # TP: precision 2/3 at recall 1
    ]
    # Envelope: 1 for recall <= 0.5 (51 of COCO's 101 recall points), 2/3 above (50 points).
    expected = (51 * 1.0 + 50 * 2 / 3) / 101
    result = coco_map(gt, detections)
    assert result["map50"] == pytest.approx(expected)
    assert result["map"] == pytest.approx(expected)  # exact boxes match at every threshold


def test_coco_map_half_overlap_counts_only_below_its_iou(tmp_path):
    gt = load_coco(_gt_file(tmp_path, {1: [(1, [0, 0, 40, 40])]}))
    # IoU of [0,0,40,40] with [0,0,40,30]: 1200 / 1600 = 0.75 -> TP at 0.50..0.75, FP above.
    result = coco_map(gt, [_det(1, 1, [0, 0, 40, 30], 0.5)])
    assert result["map50"] == pytest.approx(1.0)
    assert result["map"] == pytest.approx(6 / 10)


def test_no_detections_score_zero(tmp_path):
    gt = load_coco(_gt_file(tmp_path, {1: [(1, [0, 0, 10, 10])]}))
    assert coco_map(gt, []) == {"map50": 0.0, "map": 0.0}
    assert coco_map_ci(gt, [], [1], 50, 0)["map50_ci95"] == [0.0, 0.0]


def _random_case(tmp_path: Path, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    objects = {}
    detections = []
    for image_id in range(1, 13):
        objs = []
        for _ in range(rng.integers(1, 4)):
            x, y = rng.integers(0, 60, 2)
            w, h = rng.integers(10, 40, 2)
            category = int(rng.integers(1, 3))
            objs.append((category, [int(x), int(y), int(w), int(h)]))
            for _ in range(2):
                jitter = rng.normal(0, 4, 4)
                box = [float(x + jitter[0]), float(y + jitter[1]),
                       float(max(w + jitter[2], 2)), float(max(h + jitter[3], 2))]
                detections.append(_det(image_id, int(rng.integers(1, 3)), box, float(rng.random())))
        objects[image_id] = objs
    return load_coco(_gt_file(tmp_path, objects)), detections


@pytest.mark.parametrize("seed", [0, 1])
def test_bootstrap_accumulation_reproduces_pycocotools_on_the_original_sample(tmp_path, seed):
    gt, detections = _random_case(tmp_path, seed)
    image_ids = sorted(gt.getImgIds())
    evaluator = evaluate(gt, detections, image_ids)
    p = evaluator.params
    ap = average_precision(class_matches(evaluator), np.ones(len(image_ids)), p.recThrs)
    assert ap[0] == pytest.approx(evaluator.stats[1], abs=1e-12)
    assert ap.mean() == pytest.approx(evaluator.stats[0], abs=1e-12)


def test_bootstrap_weights_equal_copies_of_images(tmp_path):
    """Weight 2 on an image equals that image twice (distinct scores: no tie-order question)."""
    gt, detections = _random_case(tmp_path, 0)
    image_ids = sorted(gt.getImgIds())
    evaluator = evaluate(gt, detections, image_ids)
    weights = np.ones(len(image_ids))
    weights[0], weights[3] = 2, 0
    doubled = [{**d, "image_id": 100} for d in detections if d["image_id"] == image_ids[0]]
    objects = {i: [(a["category_id"], a["bbox"]) for a in gt.loadAnns(gt.getAnnIds(imgIds=i))]
               for i in image_ids if i != image_ids[3]}
    objects[100] = objects[image_ids[0]]
    copied_gt = load_coco(_gt_file(tmp_path, objects))
    kept = [d for d in detections if d["image_id"] != image_ids[3]] + doubled
    expected = evaluate(copied_gt, kept, sorted(objects)).stats
    ap = average_precision(class_matches(evaluator), weights, evaluator.params.recThrs)
    assert ap[0] == pytest.approx(expected[1], abs=1e-9)
    assert ap.mean() == pytest.approx(expected[0], abs=1e-9)


def test_coco_map_ci_is_seeded_and_brackets_the_estimate(tmp_path):
    gt, detections = _random_case(tmp_path, 0)
    image_ids = sorted(gt.getImgIds())
    first = coco_map_ci(gt, detections, image_ids, 200, seed=3)
    assert first == coco_map_ci(gt, detections, image_ids, 200, seed=3)
    assert first["map50_ci95"][0] <= first["map50"] <= first["map50_ci95"][1]
    assert first["map_ci95"][0] <= first["map"] <= first["map_ci95"][1]

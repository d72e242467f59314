"""The bbox probe on small synthetic data: its targets, its decoding, and its controls."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vlmprobe.data.dataset import SPLITS, load_split
from vlmprobe.data.shapes import generate_shapes
from vlmprobe.extract.geometry import TokenGeometry
from vlmprobe.probes.controls import oracle_tokens, shuffled_tokens
from vlmprobe.probes.coverage import (
    EDGES,
    ProbeSettings,
    RenderedCoverage,
    class_ids,
    decode_components,
    decode_token_boxes,
    instance_targets,
    pixel_frame,
    run_bbox_probe,
)

GEOMETRY = TokenGeometry.single_grid((112, 112), 8, 8)
SETTINGS = ProbeSettings(
    alphas=[1e-3, 1e-1], thresholds=[0.2, 0.4], min_component_px=4, bootstrap=200, seed=0
)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    generate_shapes(root, seed=3, image_size=112, n_train=60, n_val=15, n_test=20,
                    min_objects=1, max_objects=3, min_size=16, max_size=40)
    return {name: load_split(root, name) for name in SPLITS}


def test_targets_are_fractions_that_sum_to_the_object_area(splits):
    split = splits["train"]
    targets = instance_targets(split, GEOMETRY)
    coverage = targets[..., :-EDGES]
    assert targets.shape == (60, 64, 3 + EDGES) and 0 <= coverage.min() and coverage.max() <= 1
    cell_area = 14 * 14
    mask_area = sum(m.sum() for m in split.masks[0])
    assert coverage[0].sum() * cell_area == pytest.approx(mask_area)


def test_edge_targets_decode_to_the_covering_instances_box(splits):
    split = splits["train"]
    targets = instance_targets(split, GEOMETRY)
    covered = targets[0, :, :-EDGES].sum(axis=1) > 0
    edges = torch.as_tensor(targets[0, :, -EDGES:], dtype=torch.float64)
    boxes = pixel_frame(GEOMETRY).decode(edges).numpy()[covered]
    for box in boxes:  # every covered token names one of the image's boxes exactly
        assert np.abs(split.boxes[0] - box).max(axis=1).min() < 1e-3
    assert (targets[0, ~covered, -EDGES:] == 0).all()


def test_token_boxes_of_the_true_targets_are_the_boxes(splits):
    split = splits["test"]
    targets = instance_targets(split, GEOMETRY)
    for i in range(5):
        found = decode_token_boxes(targets[i], pixel_frame(GEOMETRY), class_ids(split), 0.2,
                                   (112, 112))
        assert len(found.boxes) == len(split.boxes[i])
        for gt, label in zip(split.boxes[i], split.labels[i], strict=True):
            nearest = np.abs(found.boxes - gt).max(axis=1).argmin()
            assert np.abs(found.boxes[nearest] - gt).max() <= 1e-3  # exact, not grid-bound
            assert found.labels[nearest] == label


def test_touching_instances_of_one_class_stay_apart_only_as_token_boxes():
    geometry = TokenGeometry.single_grid((64, 64), 8, 8)
    masks = np.zeros((2, 64, 64), dtype=bool)
    masks[0, 16:48, 8:32] = True  # two boxes of one class that share an edge at x = 32
    masks[1, 16:48, 32:56] = True
    boxes = np.array([[8, 16, 32, 48], [32, 16, 56, 48]], dtype=np.float64)
    split = SimpleNamespace(categories=[{"id": 1}], images=np.zeros((1, 64, 64, 3), np.uint8),
                            image_ids=[0], masks=[masks], labels=[np.array([1, 1])],
                            boxes=[boxes])
    targets = instance_targets(split, geometry)[0]
    by_tokens = decode_token_boxes(targets, pixel_frame(geometry), [1], 0.3, (64, 64))
    np.testing.assert_allclose(sorted(by_tokens.boxes.tolist()), boxes, atol=1e-3)
    merged = decode_components(RenderedCoverage.of(targets[:, :1], geometry), [1], 0.3, 4)
    assert len(merged.boxes) == 1  # one component spans both instances


def test_oracle_passes_and_its_shuffled_version_fails(splits):
    targets = {n: instance_targets(s, GEOMETRY) for n, s in splits.items()}
    oracle = {n: oracle_tokens(t, 64, 0.05, seed=0, stream=i)
              for i, (n, t) in enumerate(targets.items())}
    good = run_bbox_probe(oracle, targets, splits, GEOMETRY, SETTINGS)
    assert good["iou"] >= 0.6 and good["selected"]["decoding"] in ("token_boxes", "components")
    lo, hi = good["iou_ci95"]
    assert lo <= good["iou"] <= hi
    shuffled = {n: shuffled_tokens(f, seed=0, stream=i) for i, (n, f) in enumerate(oracle.items())}
    assert run_bbox_probe(shuffled, targets, splits, GEOMETRY, SETTINGS)["iou"] <= 0.2


def test_oracle_map_is_shared_across_splits_and_noise_is_not():
    coverage = np.random.default_rng(0).uniform(size=(2, 4, 3))
    a = oracle_tokens(coverage, 16, 0.0, seed=1, stream=0)
    b = oracle_tokens(coverage, 16, 0.0, seed=1, stream=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(oracle_tokens(coverage, 16, 0.1, 1, 0),
                              oracle_tokens(coverage, 16, 0.1, 1, 1))


def test_shuffling_permutes_tokens_within_each_image_only():
    features = np.arange(2 * 5 * 1, dtype=np.float32).reshape(2, 5, 1)
    out = shuffled_tokens(features, seed=0, stream=0)
    for i in range(2):
        assert sorted(out[i, :, 0]) == sorted(features[i, :, 0])
    assert not np.array_equal(out, features)

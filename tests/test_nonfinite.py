"""No non-finite value is ever stored or scored: NaN injected into every metric, a detection
head's output, a feature batch through the engine and the metrics writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.cocoeval import COCOeval

from test_metrics_coco_map import _det, _gt_file
from test_models_vlm import CPU, images, loaded
from test_probe_trained import DENSE, tiny  # noqa: F401 (`tiny` is a fixture)
from vlmprobe.align import intervals
from vlmprobe.align import metrics as align
from vlmprobe.extract.engine import (
    NonFiniteFeatures,
    extract_to_store,
    finiteness,
    require_finite_features,
)
from vlmprobe.extract.store import STORED_DTYPE, shard_path
from vlmprobe.io import NonFiniteJSON, write_json
from vlmprobe.metrics import boxes, coco_map, image
from vlmprobe.metrics.finite import NonFiniteInput, nonfinite_counts, require_finite
from vlmprobe.models import box_text
from vlmprobe.probes import coverage, detr, grounding
from vlmprobe.probes.dense import DenseHead, run_dense_probe
from vlmprobe.probes.detection import (
    Detections,
    NonFiniteDetections,
    detection_scores,
    invalid_result,
)
from vlmprobe.probes.training import FitSettings
from vlmprobe.probes.validity import Band, probe_validity

NAN = float("nan")


def with_nan(x) -> np.ndarray:
    """A float copy of `x` with its first value NaN."""
    x = np.array(x, dtype=np.float64)
    x.reshape(-1)[0] = NAN
    return x


def features(n: int = 8, d: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d))


def gram(n: int = 8) -> np.ndarray:
    return align.linear_gram(features(n))


def picture() -> np.ndarray:
    return np.random.default_rng(0).random((16, 16, 3))


def masks() -> np.ndarray:
    m = np.zeros((1, 16, 16), dtype=bool)
    m[0, 4:10, 4:10] = True
    return m


GOOD_BOX = np.array([[1.0, 1.0, 5.0, 5.0]])


def coco_gt(tmp_path: Path):
    return coco_map.load_coco(_gt_file(tmp_path, {1: [(1, [10, 10, 20, 20])]}))


# (metric, argument named in the error, call with one NaN in that argument)
METRIC_CASES = [
    ("box_iou_matrix", "a", lambda _: boxes.box_iou_matrix(with_nan(GOOD_BOX), GOOD_BOX)),
    ("matched_iou", "pred", lambda _: boxes.matched_iou(GOOD_BOX, with_nan(GOOD_BOX))),
    ("matched_iou", "gt", lambda _: boxes.matched_iou(with_nan(GOOD_BOX), np.zeros((0, 4)))),
    ("ratio_of_sums", "sums", lambda _: boxes.ratio_of_sums(with_nan([1, 2]), np.ones(2))),
    ("bootstrap_ci", "denoms", lambda _: boxes.bootstrap_ci(np.ones(3), with_nan([1, 1, 1]),
                                                            100, 0)),
    ("coco_map", "bbox", lambda p: coco_map.coco_map(
        coco_gt(p), [_det(1, 1, [NAN, 10, 20, 20], 0.9)])),
    ("coco_map", "score", lambda p: coco_map.coco_map_ci(
        coco_gt(p), [_det(1, 1, [10, 10, 20, 20], NAN)], [1], 100, 0)),
    ("ssim", "b", lambda _: image.ssim(picture(), with_nan(picture()))),
    ("edge_map", "image", lambda _: image.edge_f1(with_nan(picture()), picture(), 0.1, 1)),
    ("recover_masks", "reconstruction", lambda _: image.spatial_iou(
        with_nan(picture()), picture(), masks())),
    ("object_palette", "original", lambda _: image.object_palette(with_nan(picture()),
                                                                  masks())),
    # Lpips refuses before touching its network, so no weights are needed here.
    ("Lpips", "a", lambda _: image.Lpips.__new__(image.Lpips)(
        with_nan(picture()[None]), picture()[None])),
    ("linear_gram", "x", lambda _: align.linear_cka(with_nan(features()), features(seed=1))),
    ("linear_gram", "x", lambda _: align.rbf_cka(features(), with_nan(features()))),
    ("hsic_unbiased", "k", lambda _: align.cka_from_grams(with_nan(gram()), gram(), True)),
    ("hsic_biased", "l", lambda _: align.hsic_biased(gram(), with_nan(gram()))),
    ("hsic_unbiased", "l", lambda _: align.minibatch_cka([(gram(), with_nan(gram()))])),
    ("squared_distances", "gram", lambda _: align.squared_distances(with_nan(gram()))),
    ("rbf_gram", "d2", lambda _: align.rbf_gram(with_nan(gram()), 1.0)),
    ("r2_score", "y_pred", lambda _: align.r2_score(features(), with_nan(features()))),
    ("ridge_r2", "x['val']", lambda _: align.ridge_r2(
        {"train": features(), "val": with_nan(features()), "test": features()},
        {s: features(seed=1) for s in ("train", "val", "test")}, [1.0])),
    ("distance_spearman", "dx2", lambda _: align.distance_spearman(with_nan(gram()),
                                                                    gram())),
    ("knn_indices", "d2", lambda _: align.knn_recall(gram(), with_nan(gram()), 3)),
    ("half_sample_ci", "statistic", lambda _: intervals.half_sample_ci(
        lambda index: NAN if len(index) == 8 else 1.0, 8, 10, 0)),
    ("bootstrap_mean_ci", "values", lambda _: intervals.bootstrap_mean_ci(
        with_nan([1, 2, 3]), 100, 0)),
    ("box_iou_matrix", "a", lambda _: grounding.grounding_scores(
        [with_nan(GOOD_BOX[0])], [GOOD_BOX[0]], [0], 100, 0)),
    ("grouped_ratio", "grounding_iou", lambda _: grounding.grouped_ratio(
        [NAN, 1.0], [0, 1], 100, 0, "grounding_iou")),
]


@pytest.mark.parametrize(("function", "argument", "call"), METRIC_CASES,
                         ids=[f"{f}({a})" for f, a, _ in METRIC_CASES])
def test_every_metric_refuses_a_nan(function, argument, call, tmp_path):
    with pytest.raises(NonFiniteInput, match=r"1 NaN and 0 inf among \d+ values") as caught:
        call(tmp_path)
    assert function in str(caught.value) and argument in str(caught.value)


def test_require_finite_counts_nan_and_inf_in_arrays_and_tensors():
    values = np.array([1.0, NAN, np.inf, -np.inf])
    assert nonfinite_counts(values) == (1, 2, 4)
    assert nonfinite_counts(torch.from_numpy(values).to(torch.bfloat16)) == (1, 2, 4)
    assert nonfinite_counts(np.arange(5)) == (0, 0, 5)  # integers are finite by construction
    with pytest.raises(NonFiniteInput, match=r"f\(x\): 1 NaN and 2 inf among 4 values"):
        require_finite("f(x)", torch.from_numpy(values))
    require_finite("f(x)", [1.0, 2.0])  # finite input passes untouched


def test_one_nan_no_longer_makes_cka_zero_but_finite_values_are_unchanged():
    x, y = features(), features(seed=1)
    before = align.linear_cka(x, y)
    require_finite("x", x)
    assert align.linear_cka(x, y) == before and x.flags.writeable  # nothing copied or changed


# --- detection probes: a non-finite box or score is an error of the probe, never a hit ---

def test_pycocotools_alone_counts_a_nan_box_as_a_hit(tmp_path):
    """Why detections are checked before COCOeval: its `iou < threshold` is False for NaN."""
    gt = coco_gt(tmp_path)
    evaluator = COCOeval(gt, gt.loadRes([_det(1, 1, [NAN, NAN, NAN, NAN], 0.9)]), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.stats[1] > 0.99  # map50 of a box that is nowhere


def test_detection_scores_refuse_nan_boxes(tiny):  # noqa: F811
    splits = tiny[0]
    n = len(splits["test"].image_ids)
    found = [Detections(np.full((2, 4), NAN), np.array([1, 1]), np.array([0.9, 0.8]))] * n
    with pytest.raises(NonFiniteDetections, match=rf"{4 * 2 * n} NaN .* in boxes .*{n} of {n}"):
        detection_scores(splits["test"], found, 100, 0)


DETR = detr.DetrSettings(
    FitSettings(steps=8, batch_size=4, lr=1e-3, eval_every=4, seed=0, threads=1),
    width=32, layers=2, queries=4, heads=2, flip=True, bootstrap=100)


def nan_boxes_in_eval(forward):
    """A DETR forward whose boxes are NaN when predicting: a head that diverged at the end."""
    def wrapped(self, tokens, token_pos):
        outputs = forward(self, tokens, token_pos)
        if self.training:
            return outputs
        return [(logits, torch.full_like(b, NAN)) for logits, b in outputs]
    return wrapped


def test_detr_head_with_nan_boxes_is_marked_invalid_not_scored(tiny, tmp_path, monkeypatch):  # noqa: F811
    splits, geometry, oracle = tiny
    monkeypatch.setattr(detr.DetrProbe, "forward", nan_boxes_in_eval(detr.DetrProbe.forward))
    metrics, found = detr.run_detr_probe(oracle, splits, geometry, DETR, tmp_path)
    assert set(metrics) == {"invalid"}  # no map50, map, CI or val_map50 as a number
    assert "no checkpoint gave finite validation detections" in metrics["invalid"]
    assert "NaN" in metrics["invalid"] and "in boxes" in metrics["invalid"]
    assert len(found) == len(splits["test"].image_ids) and all(len(f.boxes) == 0 for f in found)
    # The controls' verdict carries the reason; the writer accepts the result.
    verdict = probe_validity("detr", {"oracle": metrics, "oracle_shuffled": {"map50": 0.0}},
                             Band(0.5, 0.1, 0.2))
    assert verdict["valid"] is False and "detr probe failed on oracle" in verdict["reason"]
    write_json(tmp_path / "probe.json", {"controls": {"oracle": {"detr": metrics}},
                                         "validity": {"detr": verdict}})


def test_detr_head_that_diverges_in_training_stops_and_is_invalid(tiny, tmp_path, monkeypatch):  # noqa: F811
    splits, geometry, oracle = tiny
    forward = detr.DetrProbe.forward
    monkeypatch.setattr(detr.DetrProbe, "forward", lambda self, t, p: [
        (logits, torch.full_like(b, NAN)) for logits, b in forward(self, t, p)])
    metrics, _ = detr.run_detr_probe(oracle, splits, geometry, DETR, tmp_path)
    assert set(metrics) == {"invalid"}
    assert "step 1: DETR head outputs in training" in metrics["invalid"]


def test_dense_head_with_nan_scores_is_marked_invalid(tiny, tmp_path, monkeypatch):  # noqa: F811
    splits, geometry, oracle = tiny
    forward = DenseHead.forward

    def nan_scores(self, tokens, g):
        logits, centre, ltrb = forward(self, tokens, g)
        return torch.full_like(logits, NAN), centre, ltrb

    monkeypatch.setattr(DenseHead, "forward", nan_scores)
    metrics, found = run_dense_probe(oracle, splits, geometry, DENSE, tmp_path)
    assert set(metrics) == {"invalid"} and "in scores" in metrics["invalid"]
    assert all(len(f.boxes) == 0 for f in found)


def test_bbox_probe_with_nan_coverage_is_marked_invalid(tiny, monkeypatch):  # noqa: F811
    splits, geometry, oracle = tiny
    targets = {n: coverage.instance_targets(s, geometry) for n, s in splits.items()}
    settings = coverage.ProbeSettings([1.0], [0.5], 4, 100, 0)
    monkeypatch.setattr(coverage, "_predict",
                        lambda linear, tokens: np.full((tokens.shape[0], geometry.n_tokens,
                                                                 3 + coverage.EDGES), NAN))
    metrics = coverage.run_bbox_probe(oracle, targets, splits, geometry, settings)
    assert set(metrics) == {"invalid"}
    assert "no ridge penalty gave a finite readout" in metrics["invalid"]


def test_parse_box_takes_a_nan_box_as_a_miss():
    assert box_text.parse_box('{"bbox_2d": [NaN, 1, 5, 5]}', "pixels-json", (10, 10)) is None


# --- the metrics writer: the last line of defence ---

def test_writer_refuses_nan_and_names_its_key_path(tmp_path):
    path = tmp_path / "probe.json"
    with pytest.raises(NonFiniteJSON,
                       match=r"points\.L5\.detr\.map50, points\.L5\.detr\.map_ci95\[1\]"):
        write_json(path, {"points": {"L5": {"detr": {"map50": NAN, "map_ci95": [0.0, np.inf]}}}})
    assert not path.exists()
    write_json(path, {"points": {"L5": {"detr": invalid_result("diverged")}}})
    assert json.loads(path.read_text()) == {"points": {"L5": {"detr": {"invalid": "diverged"}}}}


# --- the extraction engine: a non-finite feature never reaches a shard ---

def test_engine_refuses_a_nan_batch_before_writing_its_shard(tmp_path, monkeypatch):
    adapter, model = loaded("llava_next_tiny")
    point_tokens = adapter.point_tokens
    calls = {"L5": 0}

    def nan_in_second_batch(point, output, inputs):
        tokens = point_tokens(point, output, inputs)
        if point == "L5":
            calls["L5"] += 1
            if calls["L5"] == 2:
                tokens = tokens.clone()
                tokens[1, 0, :3] = NAN
        return tokens

    monkeypatch.setattr(adapter, "point_tokens", nan_in_second_batch)
    with pytest.raises(NonFiniteFeatures) as caught:
        extract_to_store(adapter, model, images(4), [10, 11, 12, 13], ["L1", "L5"], tmp_path,
                         batch_size=2, shard_size=2, device=CPU, manifest_extra={})
    message = str(caught.value)
    assert "point 'L5': 3 NaN and 0 inf among" in message
    assert "images [13]" in message and "indices [3]" in message
    assert "bf16" in message and "inv_freq" in message and "Fix:" in message
    assert shard_path(tmp_path, "L5", 0).exists()  # the finite first batch was stored
    assert not shard_path(tmp_path, "L1", 1).exists()  # nothing of the refused batch
    assert not shard_path(tmp_path, "L5", 1).exists()
    assert not (tmp_path / "manifest.json").exists()


def test_engine_refuses_values_the_float16_store_would_hold_as_inf():
    tokens = torch.zeros(2, 3, 4)
    tokens[0, 1, 2] = 1e5  # finite in fp32, beyond float16's 65504
    stored = tokens.to(STORED_DTYPE)
    with pytest.raises(NonFiniteFeatures, match=r"0 NaN and 1 inf .*1 of the inf are finite"):
        require_finite_features("V", stored, finiteness(tokens, stored).tolist(), [7, 8], 0)
    tokens[0, 1, 2] = float("inf")  # inf before the cast: not an overflow
    stored = tokens.to(STORED_DTYPE)
    with pytest.raises(NonFiniteFeatures) as caught:
        require_finite_features("V", stored, finiteness(tokens, stored).tolist(), [7, 8], 0)
    assert "0 NaN and 1 inf" in str(caught.value) and "finite values beyond" not in str(
        caught.value)
    ones = torch.ones(2, 3, 4)
    require_finite_features("V", ones.half(), finiteness(ones, ones.half()).tolist(), [7, 8], 0)

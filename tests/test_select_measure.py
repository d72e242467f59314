"""Criteria on intervals, the weighted score's normalisation, and reading measurements from
metrics files: absent or invalid is not measured, never guessed."""

from __future__ import annotations

from dataclasses import replace

import pytest

from vlmprobe.models.registry import RegistryError, get_entry
from vlmprobe.select.criteria import (
    FAIL,
    NOT_MEASURED,
    PASS,
    UNDECIDED,
    Criterion,
    Measurement,
    judge,
)
from vlmprobe.select.measure import (
    best_measurement,
    build_run,
    declared_complexity,
    measure,
    speed_ratio,
)
from vlmprobe.select.score import normalise, weighted_score

ABOVE = Criterion("spatial_iou", ">", 0.6, "Spatial IoU > 0.60")
BELOW = Criterion("lpips", "<", 0.35, "LPIPS < 0.35")


@pytest.mark.parametrize("criterion, measurement, verdict", [
    (ABOVE, Measurement(0.7, (0.65, 0.75), "t"), PASS),
    (ABOVE, Measurement(0.5, (0.45, 0.55), "t"), FAIL),
    (ABOVE, Measurement(0.62, (0.58, 0.66), "t"), UNDECIDED),
    (ABOVE, Measurement(0.6, None, "t"), FAIL),  # strictly above: the threshold itself fails
    (ABOVE, Measurement(0.65, (0.6, 0.7), "t"), UNDECIDED),
    (BELOW, Measurement(0.2, (0.18, 0.22), "t"), PASS),
    (BELOW, Measurement(0.34, (0.30, 0.38), "t"), UNDECIDED),
    (BELOW, None, NOT_MEASURED),
])
def test_judge_uses_the_whole_interval(criterion, measurement, verdict):
    assert judge(criterion, measurement) == verdict


def test_bad_operator_in_the_plan_names_the_choices():
    with pytest.raises(ValueError, match=r"has op '>='; expected one of"):
        Criterion.from_plan({"quantity": "x", "op": ">=", "threshold": 1})


@pytest.mark.parametrize("quantity, value, expected", [
    ("spatial_iou", 0.7, 0.7), ("bbox_iou", 0.2, 0.2), ("lpips", 0.25, 0.75),
    ("lpips", 1.4, 0.0), ("speed_ratio", 0.5, 1.0), ("speed_ratio", 2.0, 0.5),
    ("integration_complexity", 0.5, 0.5),
])
def test_normalisation(quantity, value, expected):
    assert normalise(quantity, Measurement(value, None, "t"))[0] == pytest.approx(expected)


def test_unmeasured_components_add_nothing_and_widen_the_bounds():
    weights = {"spatial_iou": 0.4, "lpips": 0.15, "speed_ratio": 0.15}
    s = weighted_score({"spatial_iou": Measurement(0.5, (0.4, 0.6), "t"),
                        "lpips": Measurement(0.2, None, "t"), "speed_ratio": None}, weights)
    assert s["score"] == pytest.approx(0.4 * 0.5 + 0.15 * 0.8)
    assert s["bounds"] == pytest.approx([0.4 * 0.4 + 0.12, 0.4 * 0.6 + 0.12 + 0.15])
    assert s["max_possible"] == pytest.approx(s["score"] + 0.15)
    assert not s["complete"] and s["components"]["speed_ratio"] is None


def probe_metrics(valid_reconstruction: bool = True) -> dict:
    return {
        "meta": {"vlm": "dinov2_small"},
        "points": {
            "early": {"bbox": {"iou": 0.3, "iou_ci95": [0.25, 0.35]},
                      "reconstruction": {"spatial_iou": 0.5, "lpips": 0.3},
                      "detr": {"map50": 0.1}, "dense": {"map50": 0.4}},
            "late": {"bbox": {"iou": 0.6, "iou_ci95": [0.55, 0.65]},
                     "reconstruction": {"spatial_iou": 0.4, "lpips": 0.2,
                                        "lpips_ci95": [0.18, 0.22]},
                     "detr": {"map50": 0.2}},
        },
        "controls": {"oracle": {"bbox": {"iou": 0.99}}},
        "validity": {"bbox": {"valid": True},
                     "reconstruction": {"valid": valid_reconstruction,
                                        "reason": "pixels spatial_iou 0.1 < 0.5"}},
    }


def test_best_valid_point_per_quantity_with_its_interval_and_source():
    found, missing = measure({"probe": probe_metrics()})
    assert found["bbox_iou"] == Measurement(0.6, (0.55, 0.65),
                                            "metrics/probe.json points.late.bbox.iou")
    assert found["lpips"].value == 0.2 and found["lpips"].ci95 == (0.18, 0.22)  # lower is better
    assert found["map50"].source == "metrics/probe.json points.early.dense.map50"
    assert found["cka"] is None and "metrics/align.json absent" in missing["cka"]


def test_invalid_probe_is_not_used():
    found, missing = measure({"probe": probe_metrics(valid_reconstruction=False)})
    assert found["spatial_iou"] is None and found["lpips"] is None
    assert "reconstruction probe invalid: pixels spatial_iou 0.1 < 0.5" in missing["spatial_iou"]
    assert found["bbox_iou"] is not None


def test_reconstruct_stage_is_preferred_over_the_probe_decoder():
    reconstruct = {"spatial_iou": 0.66, "spatial_iou_ci95": [0.6, 0.7]}
    found, _ = measure({"probe": probe_metrics(), "reconstruct": reconstruct})
    assert found["spatial_iou"].source == "metrics/reconstruct.json spatial_iou"
    assert found["lpips"].source.startswith("metrics/probe.json")  # not in reconstruct.json


def test_speed_only_against_a_baseline_on_the_same_machine():
    mine = {"device": "cuda", "host": "a", "seconds_per_image": 0.3}
    ratio, _ = speed_ratio(mine, {"device": "cuda", "host": "a", "seconds_per_image": 0.1}, "Q")
    assert ratio.value == pytest.approx(3.0) and ratio.ci95 is None
    for other in ({"device": "cpu", "seconds_per_image": 0.1},
                  {"device": "cuda", "host": "b", "seconds_per_image": 0.1}):
        ratio, why = speed_ratio(mine, other, "Q")
        assert ratio is None and "another machine" in why
    ratio, why = speed_ratio(mine, None, "Q")
    assert ratio is None and why == "no Q baseline run to compare with"
    ratio, why = speed_ratio({"device": "cuda", "seconds_per_image": None},
                             {"device": "cuda", "seconds_per_image": 0.1}, "Q")
    assert ratio is None and "not recorded" in why


def test_integration_complexity_is_declared_in_the_registry():
    level, measured = declared_complexity(get_entry("cogvlm2"))
    assert level == "high" and measured.value == 0.0 and "declared" in measured.source
    assert declared_complexity(get_entry("pixels")) == (None, None)
    run = build_run("px", "pixels", get_entry("pixels"), {"probe": probe_metrics()},
                    (None, "no baseline"))
    assert run.kind == "control" and run.measurements["integration_complexity"] is None
    assert "no integration_complexity" in run.missing["integration_complexity"]


def test_malformed_complexity_names_the_entry_and_the_choices():
    entry = get_entry("pixels")
    bad = type(entry)(**{**entry.__dict__,
                         "options": {**entry.options, "integration_complexity": "easy"}})
    with pytest.raises(RegistryError, match="low, medium, high"):
        declared_complexity(bad)


def test_invalid_reconstruct_stage_falls_back_to_the_probe_decoder_saying_why():
    reason = "pixels spatial_iou 0.600 < 0.7"
    reconstruct = {"points": {"p": {"spatial_iou": 0.9}},
                   "validity": {"reconstruction": {"metric": "spatial_iou", "valid": False,
                                                   "reason": reason}}}
    found, _ = measure({"probe": probe_metrics(), "reconstruct": reconstruct})
    assert found["spatial_iou"].value == 0.5  # the probe stage's decoder, not the invalid 0.9
    assert f"reconstruction probe invalid: {reason}" in found["spatial_iou"].source
    found, missing = measure({"probe": probe_metrics(valid_reconstruction=False),
                              "reconstruct": reconstruct})
    assert found["spatial_iou"] is None
    why = missing["spatial_iou"]
    assert reason in why and "reconstruction probe" in why


def test_a_quantity_not_applicable_says_why():
    ground = {"not_applicable": {"grounding": "not applicable: x does not generate text",
                                 "vqa": "not applicable: x does not generate text"}}
    found, why = best_measurement(ground, "metrics/ground.json", ("vqa_acc",), False)
    assert found is None
    assert why == "vqa_acc not in metrics/ground.json (not applicable: x does not generate text)"


def test_training_seeds_widen_the_interval_so_noise_is_no_difference():
    # DETR-style map50 from two seeds, 0.847 and 0.825 (the spread two CPUs gave one seed)
    metrics = {"points": {"final": {"detr": {"map50": 0.847, "map50_ci95": [0.83, 0.86],
                                             "map50_seeds": [0.847, 0.825]}}},
               "validity": {"detr": {"valid": True}}}
    m, _ = best_measurement(metrics, "metrics/probe.json", ("detr.map50",), False)
    assert m.seeds == (0.847, 0.825) and m.ci95 == (0.83, 0.86)
    assert m.interval == pytest.approx((0.83 - 0.022, 0.86))
    # Inside the bootstrap interval a threshold of 0.82 passes; within the seeds' noise it is
    # not decided.
    assert judge(Criterion("map50", ">", 0.82, ""), replace(m, seeds=None)) == "pass"
    assert judge(Criterion("map50", ">", 0.82, ""), m) == "undecided"


def test_a_hybrids_speed_is_both_parts_forward_passes():
    parts = {"vlm": {"entry": "qwen2_5_vl"}, "spatial": {"entry": "dinov2_small"}}
    hybrid = {"device": "cuda", "seconds_per_image": 0.3, "weights": {"parts": parts}}
    ratio, _ = speed_ratio(hybrid, {"device": "cuda", "seconds_per_image": 0.2}, "Q")
    assert ratio.value == pytest.approx(1.5)
    assert "a hybrid: both parts' forward passes, qwen2_5_vl + dinov2_small" in ratio.source

"""The spatial report: plan bands per cell, go/no-go from valid probes only, plan figures."""

from __future__ import annotations

import pytest

from vlmprobe.report.spatial import band, go_no_go, plan, spatial_markdown, spatial_summary


def _metrics(reconstruction_valid: bool = True, spatial_iou: float = 0.62) -> dict:
    point = {"bbox": {"iou": 0.55, "iou_ci95": [0.5, 0.6]}, "dense": {"map50": 0.9},
             "reconstruction": {"lpips": 0.32, "spatial_iou": spatial_iou,
                                "spatial_iou_ci95": [0.55, 0.7]}}
    validity = {
        probe: {"valid": True, "reason": "controls within their bands"}
        for probe in ("bbox", "dense", "detr")
    }
    validity["reconstruction"] = {"valid": reconstruction_valid, "reason": "pixels missed"}
    return {
        "meta": {"vlm": "m", "display_name": "M", "weights_source": "w", "n_train": 3,
                 "n_val": 1, "n_test": 1},
        "points": {"early": {"bbox": {"iou": 0.3, "iou_ci95": [0.2, 0.4]}}, "final": point},
        "controls": {"oracle": {"bbox": {"iou": 0.8, "iou_ci95": [0.7, 0.9]}}},
        "validity": validity,
    }


@pytest.mark.parametrize(("metric", "value", "verdict"), [
    ("bbox_iou", 0.65, "target"), ("bbox_iou", 0.55, "acceptable"), ("bbox_iou", 0.45, "marginal"),
    ("bbox_iou", 0.35, "fail"), ("lpips", 0.25, "target"), ("lpips", 0.5, "fail"),
    ("spatial_iou", 0.45, "fail"),
])
def test_band_follows_the_plan(metric, value, verdict):
    assert band(metric, value, plan()["bands"]) == verdict


def test_go_when_every_threshold_passes_at_the_best_point():
    result = go_no_go(_metrics(), plan())
    assert result["verdict"] == "GO"
    assert result["checks"]["bbox_iou"] == {"status": "pass", "point": "final", "probe": "bbox",
                                            "value": 0.55, "threshold": 0.4}


def test_no_go_when_a_valid_probe_misses():
    assert go_no_go(_metrics(spatial_iou=0.4), plan())["verdict"] == "NO-GO"


def test_an_invalid_probe_gives_no_decision():
    result = go_no_go(_metrics(reconstruction_valid=False), plan())
    assert result["verdict"] == "NO DECISION"
    assert "invalid" in result["checks"]["spatial_iou"]["why"]


def test_markdown_marks_bands_and_labels_plan_figures():
    metrics = _metrics(reconstruction_valid=False)
    text = spatial_markdown(spatial_summary(metrics), metrics, {"fig": "a.png"})
    assert "0.550 [0.50, 0.60] **A**" in text  # bbox IoU, acceptable
    assert "0.620 [0.55, 0.70] **T** (invalid)" in text  # reconstruction probe invalid
    assert "Plan figures for Qwen2.5-VL (not measured here)" in text
    assert "| early | 0.300 [0.20, 0.40] **F** | - |" in text
    assert "![fig](a.png)" in text


def test_each_invalid_probe_says_why_and_what_would_make_it_valid():
    metrics = _metrics()
    metrics["validity"]["reconstruction"] = {
        "metric": "spatial_iou", "positive": "pixels", "positive_value": 0.42,
        "positive_min": 0.7, "negative": "shuffled", "negative_value": 0.1, "positive_pass": False,
        "negative_pass": True, "valid": False, "reason": "pixels spatial_iou 0.420 < 0.7"}
    metrics["validity"]["detr"] = {
        "metric": "map50", "positive": "oracle", "positive_value": 0.9, "positive_min": 0.6,
        "negative": "oracle_shuffled", "negative_value": 0.4, "positive_pass": True,
        "negative_pass": False, "valid": False, "reason": "oracle_shuffled not clearly below"}
    summary = spatial_summary(metrics)
    probes = summary["probes"]
    assert probes["bbox"]["to_make_valid"] is None  # valid
    why = probes["reconstruction"]["to_make_valid"]
    assert "pixels spatial_iou 0.420 < 0.7" in why and "now 3" in why
    assert "`probe.reconstruction.steps`" in why and "`probe.device: cuda`" in why
    assert "oracle_shuffled map50 0.400" in probes["detr"]["to_make_valid"]
    text = spatial_markdown(summary, metrics, {})
    assert f"- reconstruction: {why}" in text and "- bbox:" not in text


def test_the_tables_show_every_probe_metric_of_the_plan_and_detr_map():
    metrics = _metrics()
    metrics["points"]["final"]["detr"] = {"map50": 0.8, "map": 0.45, "map_ci95": [0.4, 0.5]}
    text = spatial_markdown(spatial_summary(metrics), metrics, {})
    header = next(line for line in text.splitlines() if line.startswith("| point |"))
    assert header.split(" | ")[1:4] == ["bbox IoU", "mAP@0.5 (dense)", "mAP@0.5 (DETR)"]
    assert "mAP (DETR)" in header and "mAP@0.5 (bbox)" not in header
    assert "0.450 [0.40, 0.50]" in text

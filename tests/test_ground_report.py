"""The ground stage's results downstream: the spatial report's grounding and VQA lines (or why
they are absent), and `vqa_acc` among the select stage's measurements."""

from __future__ import annotations

from test_report_spatial import _metrics
from vlmprobe.report.spatial import spatial_markdown, spatial_summary
from vlmprobe.select.measure import measure

GROUND = {
    "grounding_iou": 0.4321, "grounding_iou_ci95": [0.3, 0.55],
    "grounding_parse_failure_rate": 0.25, "grounding_questions": 40,
    "vqa_acc": 0.8, "vqa_acc_ci95": [0.7, 0.9], "vqa_questions": 60,
    "vqa_acc_count": 0.5, "vqa_acc_count_ci95": [0.3, 0.7], "vqa_questions_count": 20,
    "not_applicable": {}, "meta": {"vlm": "qwen2_5_vl_tiny"},
}


def test_report_shows_grounding_and_vqa_with_intervals():
    metrics = _metrics()
    summary = spatial_summary(metrics, GROUND)
    assert summary["grounding_and_vqa"]["metrics"]["vqa_acc"] == {"value": 0.8,
                                                                  "ci95": [0.7, 0.9]}
    text = spatial_markdown(summary, metrics, {})
    assert "## Grounding and VQA (E-P4.3, H-P4)" in text
    assert "- grounding IoU (a miss scores 0): 0.432 [0.30, 0.55]" in text
    assert "- grounding answers with no usable box: 0.250" in text
    assert "- VQA: count: 0.500 [0.30, 0.70]" in text
    assert "grounding questions 40" in text


def test_report_says_why_grounding_is_absent():
    metrics = _metrics()
    why = "not applicable: dinov2_small does not generate text"
    text = spatial_markdown(spatial_summary(metrics, {"not_applicable": {"grounding": why,
                                                                         "vqa": why}}),
                            metrics, {})
    assert f"- grounding: {why}" in text and f"- vqa: {why}" in text
    assert "metrics/ground.json absent" in spatial_markdown(spatial_summary(metrics), metrics, {})


def test_select_measures_vqa_accuracy_from_ground_json():
    measurements, missing = measure({"ground": GROUND})
    m = measurements["vqa_acc"]
    assert (m.value, m.ci95, m.source) == (0.8, (0.7, 0.9), "metrics/ground.json vqa_acc")
    measurements, missing = measure({"ground": {"not_applicable": {"vqa": "n/a"}}})
    assert measurements["vqa_acc"] is None and "vqa_acc not in" in missing["vqa_acc"]
    measurements, missing = measure({})
    assert "metrics/ground.json absent" in missing["vqa_acc"]

"""Every row of the plan's decision tables (E-P4.4, E-P4.7, section 5.3), with crafted
measurements, including the undecided and not-measured cases."""

from __future__ import annotations

import pytest

from vlmprobe.report.spatial import plan
from vlmprobe.select.criteria import Measurement
from vlmprobe.select.tables import (
    UNDECIDED_SAMPLE,
    UNDECIDED_UNMEASURED,
    Candidate,
    apply_table,
    recommendation_framework,
    selection_matrix,
    success_summary,
)

PLAN = plan()


def m(value: float, lo: float | None = None, hi: float | None = None) -> Measurement:
    return Measurement(value, None if lo is None else (lo, hi), "test")


def candidate(name: str, score: float = 0.5, complexity: float | None = None,
              **values: Measurement | None) -> Candidate:
    return Candidate(name, values, score, complexity)


# E-P4.4: spatial IoU > 0.50, bbox IoU > 0.40, LPIPS < 0.40, speed < 3x.
BBOX_OK, FAST, MAP_OK = m(0.5, 0.45, 0.55), m(1.5), m(0.3, 0.25, 0.35)


def screened(name, spatial, score=0.5, bbox=BBOX_OK, speed=FAST):
    return candidate(name, score, spatial_iou=spatial, bbox_iou=bbox, lpips=m(0.2, 0.18, 0.22),
                     speed_ratio=speed)


PASSES = m(0.7, 0.65, 0.75)
FAILS = m(0.3, 0.25, 0.35)
STRADDLES = m(0.5, 0.45, 0.55)


def selection(*candidates):
    return apply_table(selection_matrix(PLAN), candidates)


def test_selection_one_vlm_exceeds_all_thresholds():
    result = selection(screened("a", PASSES), screened("b", FAILS))
    assert (result["status"], result["row"], result["models"]) == ("decided", "single", ["a"])
    assert result["action"] == "Continue with single candidate"


def test_selection_multiple_vlms_exceed_thresholds_takes_top_two_by_score():
    result = selection(screened("a", PASSES, 0.6), screened("b", PASSES, 0.8),
                       screened("c", PASSES, 0.7))
    assert (result["row"], result["models"]) == ("multiple", ["b", "c"])
    assert result["action"] == "Select top 2 based on weighted score"


def test_selection_one_vlm_has_iou_others_fail_keeps_hybrid_backup():
    iou_only = screened("a", PASSES, bbox=m(0.2, 0.15, 0.25))  # fails bbox, passes IoU
    result = selection(iou_only, screened("b", FAILS))
    assert (result["row"], result["models"]) == ("single_iou", ["a"])
    assert result["action"] == "Continue with single candidate + hybrid backup"


def test_selection_all_fail_iou_stops():
    result = selection(screened("a", FAILS), screened("b", m(0.5)))  # 0.50 is not > 0.50
    assert result["row"] == "all_fail_iou"
    assert result["action"].startswith("STOP - pivot to hybrid architecture")


def test_selection_case_no_row_covers_is_reported_not_forced():
    slow = m(4.0)
    result = selection(screened("a", PASSES, speed=slow), screened("b", PASSES, speed=slow))
    assert (result["row"], result["models"]) == ("not_covered", ["a", "b"])


def test_selection_interval_straddling_iou_threshold_is_not_decided():
    result = selection(screened("a", STRADDLES), screened("b", FAILS))
    assert result["status"] == UNDECIDED_SAMPLE == "not decided at this sample size"
    assert {p["row"] for p in result["possible"]} == {"single", "all_fail_iou"}
    assert {"model": "a", "criterion": "Spatial IoU (best point)", "verdict": "undecided",
            "interval": [0.45, 0.55]} in result["open_criteria"]


def test_selection_unmeasured_speed_is_not_guessed():
    result = selection(screened("a", PASSES, speed=None), screened("b", FAILS))
    assert result["status"] == UNDECIDED_UNMEASURED
    assert {p["row"] for p in result["possible"]} == {"single", "single_iou"}


def test_selection_open_criteria_that_cannot_change_the_row_leave_it_decided():
    # b's speed is unknown but b fails IoU, so it can neither exceed nor pass IoU.
    result = selection(screened("a", PASSES), screened("b", FAILS, speed=None))
    assert (result["status"], result["row"]) == ("decided", "single")


def test_no_candidates_is_its_own_outcome():
    assert selection()["row"] == "no_candidates"


# E-P4.7: must pass spatial IoU > 0.60, mAP@0.5 > 0.20, LPIPS < 0.35.
def final(name, spatial, map50=MAP_OK, score=0.5, complexity=None):
    return candidate(name, score, complexity, spatial_iou=spatial, map50=map50,
                     lpips=m(0.2, 0.18, 0.22))


def recommend(*candidates):
    return apply_table(recommendation_framework(PLAN), candidates)


def test_recommendation_one_vlm_meets_all_must_pass_proceeds():
    result = recommend(final("a", PASSES), final("b", FAILS))
    assert (result["row"], result["models"]) == ("proceed", ["a"])
    assert result["action"] == "Proceed - Switch to new VLM"


def test_recommendation_multiple_meet_must_pass_select_by_score_then_complexity():
    result = recommend(final("a", PASSES, score=0.6), final("b", PASSES, score=0.7))
    assert (result["row"], result["models"]) == ("select", ["b"])
    assert result["action"] == "Select by weighted score + complexity"
    tie = recommend(final("a", PASSES, score=0.7, complexity=0.0),
                    final("b", PASSES, score=0.7, complexity=1.0))
    assert tie["models"] == ["b"]  # equal scores: the lower integration complexity wins


def test_recommendation_one_meets_spatial_but_fails_others_investigates():
    result = recommend(final("a", PASSES, map50=m(0.05, 0.02, 0.08)), final("b", FAILS))
    assert (result["row"], result["models"]) == ("investigate", ["a"])
    assert result["action"] == "Investigate - May need adapter modifications"


def test_recommendation_no_vlm_above_055_pivots():
    result = recommend(final("a", m(0.53, 0.51, 0.54)), final("b", FAILS))
    assert result["row"] == "pivot"
    assert result["action"] == "Pivot - Hybrid architecture required"


def test_recommendation_no_vlm_above_050_is_a_major_pivot_not_a_pivot():
    result = recommend(final("a", m(0.45, 0.40, 0.50)), final("b", FAILS))
    assert result["row"] == "major_pivot"
    assert result["action"] == "Major Pivot - Rethink fundamental approach"


def test_recommendation_best_between_055_and_060_is_not_covered():
    assert recommend(final("a", m(0.58, 0.56, 0.59)))["row"] == "not_covered"


def test_recommendation_interval_across_pivot_thresholds_is_not_decided():
    result = recommend(final("a", m(0.55, 0.45, 0.62)))
    assert result["status"] == UNDECIDED_SAMPLE
    assert {p["row"] for p in result["possible"]} == {
        "proceed", "not_covered", "pivot", "major_pivot"}


def test_recommendation_unmeasured_map_is_not_guessed():
    result = recommend(final("a", PASSES, map50=None))
    assert result["status"] == UNDECIDED_UNMEASURED
    assert {p["row"] for p in result["possible"]} == {"proceed", "investigate"}


# Section 5.3.
def level(name, spatial, map50=MAP_OK):
    return candidate(name, spatial_iou=spatial, bbox_iou=m(0.6), map50=map50, lpips=m(0.2),
                     cka=m(0.5))


def success(*candidates):
    return apply_table(success_summary(PLAN), candidates)


@pytest.mark.parametrize("candidates, row", [
    ([level("a", m(0.65)), level("b", FAILS)], "full"),
    ([level("a", m(0.58)), level("b", FAILS)], "partial"),
    ([level("a", m(0.4), map50=m(0.05)), level("b", FAILS, map50=m(0.01))], "failure"),
    ([level("a", m(0.4), map50=m(0.15))], "not_covered"),  # mAP 0.15: neither level
])
def test_success_levels(candidates, row):
    result = success(*candidates)
    assert (result["status"], result["row"]) == ("decided", row)


def test_success_level_undecided_when_an_interval_straddles():
    result = success(level("a", m(0.6, 0.57, 0.63)))
    assert result["status"] == UNDECIDED_SAMPLE
    assert {p["row"] for p in result["possible"]} == {"full", "partial"}

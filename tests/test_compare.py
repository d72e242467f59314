"""`vlmprobe compare` from crafted `dvc exp show --json` output and metrics files: the four
deliverables, the ranking and each table's outcome, the baseline column and its label."""

from __future__ import annotations

import pytest

from vlmprobe.compare.deliverables import DOCUMENTS
from vlmprobe.compare.deliverables import write_deliverables as write
from vlmprobe.compare.gather import rows

FILES: dict[str, dict[str, dict]] = {}  # revision -> metrics path -> content (git, in real use)


def read(rev: str, path: str) -> dict | None:
    return FILES.get(rev, {}).get(path)


def write_deliverables(shown, out, kinds, baseline):
    return write(shown, read, out, kinds, baseline)


def probe(vlm, spatial, ci, bbox=0.5, map50=0.3, lpips=0.2):
    return {"meta": {"vlm": vlm},
            "points": {"p": {"bbox": {"iou": bbox, "iou_ci95": [bbox - 0.02, bbox + 0.02]},
                             "detr": {"map50": map50},
                             "reconstruction": {"spatial_iou": spatial, "spatial_iou_ci95": ci,
                                                "lpips": lpips,
                                                "lpips_ci95": [lpips - 0.01, lpips + 0.01]}}},
            "validity": {"bbox": {"valid": True}, "reconstruction": {"valid": True}}}


def row(name, vlm, spatial, ci, seconds, **kw):
    """An experiment's `dvc exp show` entry; its metrics files go to FILES (exp show drops
    the intervals, so compare reads the files)."""
    rev = f"{name:0<40}"
    FILES[rev] = {"metrics/probe.json": probe(vlm, spatial, ci, **kw),
                  "metrics/extract.json": {"device": "cpu", "seconds_per_image": seconds}}
    return {"rev": rev, "name": name, "error": None,
            "data": {"params": {"params.yaml": {"data": {"vlm": vlm}}}, "metrics": {}}}


def exp_show(*experiments):
    top = {"rev": "c" * 40, "name": "main", "error": None,
           "data": {"params": {}, "metrics": {}},
           "experiments": [{"name": e["name"], "revs": [e]} for e in experiments]}
    workspace = {"rev": "workspace", "name": None, "error": None, "experiments": None,
                 "data": {"params": {}, "metrics": {}}}
    return [workspace, top]


LLAVA = row("llava", "llava_next_tiny", 0.7, [0.65, 0.75], 0.2)
INTERN = row("intern", "internvl2_tiny", 0.45, [0.40, 0.50], 0.2)
PIXELS = row("px", "pixels", 0.9, [0.88, 0.92], 0.01)


def test_duplicates_keep_the_experiment_name():
    FILES["workspace"] = FILES[LLAVA["rev"]]
    found = rows(exp_show(LLAVA), read)
    del FILES["workspace"]
    assert [(r.name, r.origin) for r in found] == [("llava", "experiment"), ("main", "commit")]


def test_four_deliverables_with_ranking_outcome_and_labelled_plan_figures(tmp_path):
    result = write_deliverables(exp_show(LLAVA, INTERN, PIXELS), tmp_path, ["vlm"],
                                "qwen2_5_vl")
    assert [r["run"] for r in result["ranking"]] == ["llava", "intern"]  # pixels: a control
    assert result["runs"]["px"]["candidate"] is False
    # No Qwen run: speed is not measured, so E-P4.4 can't tell "single" from "single + backup".
    assert result["selection"]["status"] == "not decided: not measured"
    assert {p["row"] for p in result["selection"]["possible"]} == {"single", "single_iou"}
    assert result["recommendation"]["row"] == "proceed"
    assert result["recommendation"]["models"] == ["llava"]
    for name in DOCUMENTS:
        assert (tmp_path / name).stat().st_size > 200
    final = (tmp_path / "final-recommendation.md").read_text()
    assert "Qwen2.5-VL (plan figures)" in final and "not re-measured" in final
    assert "CogVLM2 (not run)" in final and "LLaVA-NeXT (not run)" not in final
    assert "Proceed - Switch to new VLM" in final
    assert "- `main`: skipped, no metrics/probe.json" in final
    summary = (tmp_path / "phase1-summary.md").read_text()
    assert "not decided: not measured" in summary and "![" in summary
    for figure in ("scores", "comparison", "alignment", "reconstruction"):
        assert f"(figures/{figure}.png)" in "".join(
            (tmp_path / d).read_text() for d in DOCUMENTS)
        assert (tmp_path / "figures" / f"{figure}.png").stat().st_size > 1000


def test_a_real_baseline_run_replaces_the_plan_figures_and_gives_speed(tmp_path):
    qwen = row("qwen", "qwen2_5_vl_tiny", 0.3, [0.25, 0.35], 0.1)
    result = write_deliverables(exp_show(LLAVA, INTERN, qwen), tmp_path, ["vlm"],
                                "qwen2_5_vl_tiny")
    assert "plan" not in result["runs"]
    assert result["runs"]["llava"]["measurements"]["speed_ratio"]["value"] == pytest.approx(2.0)
    assert result["selection"]["status"] == "decided"
    assert (result["selection"]["row"], result["selection"]["models"]) == ("single", ["llava"])
    final = (tmp_path / "final-recommendation.md").read_text()
    assert "`qwen` (baseline)" in final


def test_straddling_interval_is_reported_undecided(tmp_path):
    unsure = row("unsure", "llava_next_tiny", 0.6, [0.55, 0.66], 0.2)
    result = write_deliverables(exp_show(unsure, INTERN), tmp_path, ["vlm"], "qwen2_5_vl")
    assert result["recommendation"]["status"] == "not decided at this sample size"
    assert "not decided at this sample size" in (tmp_path / "final-recommendation.md").read_text()


def test_the_plans_pivots_stand_beside_the_candidates(tmp_path):
    hybrid = row("hyb", "hybrid_qwen2_5_vl_dinov2", 0.8, [0.75, 0.85], 0.3)
    result = write_deliverables(exp_show(LLAVA, hybrid), tmp_path, ["vlm"], "qwen2_5_vl")
    assert [r["run"] for r in result["ranking"]] == ["llava"]  # kind hybrid: not decided on
    summary = (tmp_path / "phase1-summary.md").read_text()
    pivots = summary.split("## The plan's pivots (section 10), beside the candidates")[1]
    assert "| `hyb` |" in pivots.split("## Other runs")[0]
    final = (tmp_path / "final-recommendation.md").read_text()
    assert ("- `hyb` (Hybrid: Qwen2.5-VL-7B-Instruct + DINOv2-S/14; plan section 10.1, hybrid "
            "architecture") in final.split("## Pivots (plan section 10)")[1]
    assert "pivot (plan section 10.1" in final  # its role in the list of runs
    # Named as candidates, the pivots are decided on like any model.
    decided = write_deliverables(exp_show(LLAVA, hybrid), tmp_path, ["vlm", "hybrid"],
                                 "qwen2_5_vl")
    assert {r["run"] for r in decided["ranking"]} == {"llava", "hyb"}

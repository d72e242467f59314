"""From a clean copy: three experiments, then `vlmprobe compare` and `vlmprobe pr-report` on
the real pipeline."""

from __future__ import annotations

import json

import pytest

from conftest import QUICK_PARAMS, make_project, run

pytestmark = pytest.mark.slow

def tiny_entry(project) -> str:
    """A `<family>_tiny` registry entry (random weights, CPU-sized); LLaVA-NeXT's if listed (a
    native transformers class, the quickest to load)."""
    listed = run(["vlmprobe", "models"], project).stdout.split()
    tiny = [name for name in listed if name.endswith("_tiny")]
    return min(tiny, key=lambda name: (name != "llava_next_tiny", name))


def test_three_experiments_then_compare_and_pr_report(tmp_path):
    # The plan's tables must say "not measured" for what the quick params leave out. Two
    # generating tiny models (Qwen2.5-VL's and another family's) for H-P4's VQA ratio, and the
    # plan's hybrid pivot (section 10.1) beside them.
    project = make_project(tmp_path / "project", QUICK_PARAMS)
    tiny = tiny_entry(project)
    qwen = "qwen2_5_vl_tiny"
    hybrid = "hybrid_qwen2_5_vl_tiny_dinov2"
    for vlm in (hybrid, qwen, tiny):
        run(["dvc", "exp", "run", "-n", vlm.replace("_", "-"), "-S", f"vlm={vlm}"], project)

    selected = json.loads((project / "metrics/select.json").read_text())
    assert selected["runs"][tiny]["vlm"] == tiny  # the workspace holds the last experiment

    printed = run(["vlmprobe", "compare"], project).stdout
    assert "E-P4.7:" in printed
    results = project / "results/p4"
    for name in ("phase1-summary.md", "alignment-study.md", "reconstruction-study.md",
                 "final-recommendation.md"):
        assert (results / name).stat().st_size > 200
    summary = (results / "phase1-summary.md").read_text()
    ranked = summary.split("## Ranked candidates")[1].split("## The plan's pivots")[0]
    for candidate in (tiny, qwen):  # kind vlm; the hybrid pivot is not ranked
        assert f"`{candidate.replace('_', '-')}` |" in ranked
    hybrid_run = hybrid.replace("_", "-")
    pivots = summary.split("## The plan's pivots (section 10)")[1].split("## Other runs")[0]
    assert f"`{hybrid_run}` |" in pivots and f"`{hybrid_run}`" not in ranked
    # H-P4: the other generating run's VQA accuracy over Qwen2.5-VL's, paired by question (the
    # random tiny models may answer nothing right: then it says so instead of a ratio).
    hp4 = summary.split("## H-P4: VQA accuracy against Qwen2.5-VL")[1]
    assert f"over `{qwen.replace('_', '-')}`'s" in hp4
    tiny_run = tiny.replace("_", "-")
    row = next(line for line in hp4.splitlines() if line.startswith(f"| `{tiny_run}`"))
    assert row.endswith(("| pass |", "| fail |", "| undecided |")) or "not measured: " in row
    final = (results / "final-recommendation.md").read_text()
    assert "## H-P4: VQA accuracy against Qwen2.5-VL" in final
    for run_name in (hybrid_run, qwen.replace("_", "-")):
        assert f"`{run_name}`" in final
    pivots = final.split("## Pivots (plan section 10)")[1]
    assert f"- `{hybrid_run}` (Hybrid: Qwen2.5-VL tiny" in pivots
    assert "Qwen2.5-VL (plan figures)" in final
    assert "not decided: not measured" in final  # no spatial IoU measured: nothing guessed

    # The PR report of the workspace against the committed (never run) main.
    run(["git", "add", "-A"], project)
    run(["git", "commit", "-qm", "results"], project)
    run(["dvc", "exp", "run", "-S", "vlm=pixels"], project)
    run(["vlmprobe", "pr-report", "--base", "main", "--out", "report"], project)
    report = (project / "report/report.md").read_text()
    assert "metrics/probe.json" in report and "plots/probe/points.csv" in report
    assert "(figures/" in report

"""Gather the runs, decide on the candidates, write the four documents and their figures."""

from __future__ import annotations

import os
from pathlib import Path

from vlmprobe.compare import documents
from vlmprobe.compare.figures import quantity_panels, score_bars
from vlmprobe.compare.gather import Reader, Row, rows, runs
from vlmprobe.compare.vqa import vqa_against_qwen
from vlmprobe.io import write_text
from vlmprobe.report.spatial import plan as load_plan
from vlmprobe.select.decide import decide, weights
from vlmprobe.select.measure import METRICS_FILES, Run, plan_baseline_run

DOCUMENTS = ("phase1-summary.md", "alignment-study.md", "reconstruction-study.md",
             "final-recommendation.md")


def candidates(found: list[Run], kinds: list[str], speed_baseline: str) -> list[str]:
    """Runs the plan decides between: of a candidate kind, and not the baseline itself."""
    return [r.name for r in found if r.kind in kinds and r.vlm != speed_baseline]


def role(run: Run, chosen: list[str], speed_baseline: str) -> str:
    if run.name in chosen:
        return "candidate"
    if run.vlm == speed_baseline:
        return "speed baseline, not a candidate"
    if run.kind in documents.PIVOTS:
        return f"pivot (plan {documents.PIVOTS[run.kind]}), not a candidate"
    return f"kind {run.kind}, not a candidate"


def write_deliverables(shown: list[dict], read: Reader, out: Path, kinds: list[str],
                       speed_baseline: str) -> dict:
    """Everything from `dvc exp show --json` output and each revision's metrics files (`read`);
    returns the decisions."""
    plan = load_plan()
    found_rows: list[Row] = rows(shown, read)
    measured, skipped = runs(found_rows, speed_baseline)
    real_baselines = [r.name for r in measured if r.vlm == speed_baseline]
    # The plan's figures stand in for the baseline until a real baseline run exists.
    baseline = real_baselines[0] if real_baselines else "plan"
    all_runs = measured if real_baselines else [plan_baseline_run(plan), *measured]
    chosen = candidates(measured, kinds, speed_baseline)
    result = decide(all_runs, chosen, plan, scope=f"runs of kind {', '.join(kinds)}, "
                    f"excluding the {speed_baseline} baseline")
    result["vqa"] = vqa_against_qwen(
        measured, {r.name: r.metrics.get(METRICS_FILES["ground"]) for r in found_rows},
        speed_baseline)
    origins = {r.name: f"{r.origin} {r.rev[:7]}" if r.origin != "workspace" else "workspace"
               for r in found_rows}
    figures_dir = out / "figures"
    links = {key: os.path.relpath(figures_dir / f"{key}.png", out)
             for key in ("scores", "comparison", "alignment", "reconstruction")}
    roles = {r.name: role(r, chosen, speed_baseline) for r in measured}
    ctx = documents.Context(origins, roles, skipped, links)
    score_bars(result["runs"], weights(plan), figures_dir / "scores.png")
    quantity_panels(result["runs"], plan["comparison"]["rows"], figures_dir / "comparison.png")
    for study in ("alignment", "reconstruction"):
        quantity_panels(result["runs"], plan["studies"][study], figures_dir / f"{study}.png")
    texts = {
        "phase1-summary.md": documents.phase1_summary(result, plan, ctx),
        "alignment-study.md": documents.study(
            "alignment", "E-P4.5 Latent alignment study",
            "Alignment between each model's latents and the video decoder's (E-P4.5).",
            result, plan, ctx),
        "reconstruction-study.md": documents.study(
            "reconstruction", "E-P4.6 Reconstruction study",
            "Reconstruction quality from each model's latents (E-P4.6). Each value names its "
            "source: the reconstruct stage where it ran, else the probe stage's decoder.",
            result, plan, ctx),
        "final-recommendation.md": documents.final_recommendation(result, plan, ctx, baseline),
    }
    for name, text in texts.items():
        write_text(out / name, text)
    return result


"""The plan's deliverables (section 11.1) as markdown, from `vlmprobe.select.decide` output.

Every number is shown with its 95% interval and source where it has one; a quantity that was not
measured says so (never a guess); plan figures are labelled as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmprobe.compare.vqa import vqa_lines
from vlmprobe.select.criteria import FAIL, PASS

QUANTITY_LABELS = {
    "spatial_iou": "Spatial IoU", "bbox_iou": "Bbox IoU", "map50": "mAP@0.5", "lpips": "LPIPS",
    "ssim": "SSIM", "cka": "CKA", "spearman": "Spearman", "r2": "Linear R^2",
    "recall_at_10": "Recall@10", "direction_acc": "Direction acc",
    "speed_ratio": "Inference (x Qwen)", "integration_complexity": "Integration complexity",
}
# Registry kinds of the plan's pivots (section 10): judged beside the candidates, not decided on
# unless `vlmprobe compare --kinds` names them.
PIVOTS = {
    "hybrid": "section 10.1, hybrid architecture: a VLM beside a spatial encoder",
    "grounding_vlm": "section 10.2, grounding-specialised VLM",
}
SCORE_NOTE = (
    "Weighted score (E-P4.4): spatial IoU 40%, bbox IoU 20%, LPIPS 15%, inference speed 15%, "
    "integration complexity 10%, each normalised to [0, 1]: IoUs as they are, LPIPS as 1 - LPIPS, "
    "speed as min(1, 1 / ratio to Qwen2.5-VL on the same machine), complexity as declared in the "
    "registry (low 1, medium 0.5, high 0; the plan calls it subjective). An unmeasured component "
    "adds nothing; the bounds take each measured component at its 95% interval's ends and each "
    "unmeasured one at 0 and 1."
)
VERDICT_NOTE = (
    "Verdicts: **pass** / **fail** when the whole 95% interval is on one side of the threshold, "
    "**undecided** when it straddles the threshold (not decided at this sample size); a trained "
    "probe run over several seeds has its interval widened by their spread first (shown as "
    "`seeds a-b`), so a difference within training noise is no difference; "
    "**not measured** when the quantity is absent or its probe failed its controls."
)


@dataclass(frozen=True)
class Context:
    """What the documents say about where the runs came from."""

    origins: dict[str, str]  # run name -> "experiment abc1234", "commit main", ...
    roles: dict[str, str]  # run name -> "candidate", "speed baseline", "control (not a candidate)"
    skipped: dict[str, str] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)  # figure key -> relative link


def fmt(judged_run: dict[str, Any], quantity: str) -> str:
    m = judged_run["measurements"].get(quantity)
    if not m or m.get("value") is None:
        return "not measured"
    if quantity == "integration_complexity":
        return f"{m['level']} (declared)"
    if quantity == "speed_ratio":
        return f"{m['value']:.2f}x"
    text = f"{m['value']:.3f}"
    if "ci95" in m:
        text += f" [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"
    if "seeds" in m:
        text += f" (seeds {min(m['seeds']):.3f}-{max(m['seeds']):.3f})"
    return text


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(r) + " |" for r in rows)]


def _marked(verdict: str) -> str:
    return f"**{verdict}**" if verdict in (PASS, FAIL) else verdict


def outcome_lines(decision: dict[str, Any]) -> list[str]:
    """A table's result: the row and action, or why it is not decided and what it could be."""
    if decision["status"] == "decided":
        models = f" ({', '.join(decision['models'])})" if decision["models"] else ""
        return [f"**{decision['outcome']}**{models}: {decision['action']}."]
    lines = [f"**{decision['status']}.** Possible outcomes:", ""]
    for p in decision["possible"]:
        models = f" ({', '.join(p['models'])})" if p["models"] else ""
        lines.append(f"- {p['outcome']}{models}: {p['action']}")
    lines += ["", "Open because of:", ""]
    for o in decision["open_criteria"]:
        where = f", 95% interval {o['interval']}" if o["interval"] else ""
        lines.append(f"- {o['model']}: {o['criterion']} {o['verdict']}{where}")
    return lines


def _plan_rows(decision: dict[str, Any], rows: dict[str, dict[str, str]]) -> list[str]:
    """The plan's table reprinted, with the row(s) this set of runs reaches marked."""
    reached = ({decision["row"]} if decision["status"] == "decided"
               else {p["row"] for p in decision["possible"]})
    mark = "reached" if decision["status"] == "decided" else "possible"
    return _table(["Outcome", "Action", "These runs"],
                  [[r["outcome"], r.get("action") or r.get("recommendation", ""),
                    mark if row in reached else ""] for row, r in rows.items()])


def _runs_line(result: dict[str, Any], ctx: Context) -> list[str]:
    lines = ["Runs compared (from `dvc exp show --json`):", ""]
    for name, run in result["runs"].items():
        role = ctx.roles.get(name, "plan figures, not a candidate")
        lines.append(f"- `{name}`: {run['display_name']} (`{run['vlm']}`, weights "
                     f"{run['weights']}), {ctx.origins.get(name, 'plan.yaml')}; {role}")
    for name, why in ctx.skipped.items():
        lines.append(f"- `{name}`: skipped, {why}")
    return [*lines, ""]


def _figure(ctx: Context, key: str, alt: str) -> list[str]:
    return [f"![{alt}]({ctx.figures[key]})", ""] if key in ctx.figures else []


def _pivot_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    if not rows:
        return []
    return ["## The plan's pivots (section 10), beside the candidates", "",
            *_table(headers, rows), ""]


def pivot_lines(runs: dict[str, Any]) -> list[str]:
    """The pivot runs' screening outcome: what the plan falls back to if no candidate passes."""
    pivots = {n: r for n, r in runs.items() if r["kind"] in PIVOTS and not r["candidate"]}
    if not pivots:
        return []
    return ["## Pivots (plan section 10)", "",
            "If no candidate meets the thresholds the plan pivots; these runs measured its "
            "pivots with the same probes, controls and criteria:", "",
            *(f"- `{n}` ({r['display_name']}; plan {PIVOTS[r['kind']]}): proceed thresholds "
              f"{r['selection']['all']}, weighted score {r['score']['score']:.3f}"
              for n, r in pivots.items()), ""]


def phase1_summary(result: dict[str, Any], plan: dict[str, Any], ctx: Context) -> str:
    quantities = [c["quantity"] for c in plan["selection"]["criteria"]]
    runs = result["runs"]

    def row(name: str, rank: str) -> list[str]:
        r = runs[name]
        s = r["score"]
        return [rank, f"`{name}`", r["display_name"], *(fmt(r, q) for q in quantities),
                f"{s['score']:.3f} [{s['bounds'][0]:.3f}, {s['bounds'][1]:.3f}]"
                + ("" if s["complete"] else " (incomplete)"), _marked(r["selection"]["all"])]

    headers = ["rank", "run", "model", *(QUANTITY_LABELS[q] for q in quantities),
               "weighted score [bounds]", "exceeds all thresholds"]
    ranked = [row(r["run"], str(r["rank"])) for r in result["ranking"]]
    pivots = [row(n, "-") for n, r in runs.items() if not r["candidate"] and r["kind"] in PIVOTS]
    others = [row(n, "-") for n, r in runs.items()
              if not r["candidate"] and r["kind"] not in PIVOTS]
    decision = result["selection"]
    lines = [
        "# E-P4.4 Phase 1 screening summary and selection",
        "",
        f"Generated by `vlmprobe compare`. Criteria, weights and the decision matrix: "
        f"{result['sources']['selection']}.",
        "",
        *_runs_line(result, ctx),
        "## Ranked candidates",
        "",
        *(_table(headers, ranked) if ranked else ["No candidate runs."]),
        "",
        *_order_note(result["ranking"]),
        *_pivot_table(headers, pivots),
        "## Other runs (references and controls, not candidates)",
        "",
        *(_table(headers, others) if others else ["None."]),
        "",
        SCORE_NOTE,
        "",
        VERDICT_NOTE,
        "",
        "## Decision matrix",
        "",
        *_plan_rows(decision, plan["selection"]["matrix"]),
        "",
        *outcome_lines(decision),
        "",
        "## Selection justification",
        "",
        *_justification(result),
        "",
        *vqa_lines(result["vqa"]),
        *_figure(ctx, "scores", "E-P4.4 weighted score by run"),
    ]
    return "\n".join(lines)


def _order_note(ranking: list[dict[str, Any]]) -> list[str]:
    pairs = [f"`{a['run']}` / `{b['run']}`"
             for a, b in zip(ranking, ranking[1:], strict=False)
             if not a["order_decided"]]
    if not pairs:
        return []
    return ["Order not decided (their score bounds overlap): " + ", ".join(pairs) + ".", ""]


def _justification(result: dict[str, Any]) -> list[str]:
    lines = []
    for name in (r["run"] for r in result["ranking"]):
        run = result["runs"][name]
        failing = [q for q, v in run["selection"].items() if q != "all" and v == FAIL]
        open_ = [f"{q} ({v})" for q, v in run["selection"].items()
                 if q != "all" and v not in (PASS, FAIL)]
        text = f"- `{name}`: proceed thresholds {run['selection']['all']}"
        if failing:
            text += f"; fails {', '.join(failing)}"
        if open_:
            text += f"; open: {', '.join(open_)}"
        lines.append(text + f"; score {run['score']['score']:.3f}.")
    return lines or ["No candidates were run, so nothing is selected."]


def study(name: str, title: str, intro: str, result: dict[str, Any], plan: dict[str, Any],
          ctx: Context) -> str:
    """A study document: each run's value of the study's quantities, with sources."""
    rows_ = plan["studies"][name]
    quantities = [r["quantity"] for r in rows_]
    runs = result["runs"]
    table = [[f"`{n}`", r["display_name"], *(fmt(r, q) for q in quantities)]
             for n, r in runs.items()]
    levels = ", ".join(f"{r['label']} {r['op']} {r['threshold']}" for r in rows_)
    sources = []
    for run_name, run in runs.items():
        for q in quantities:
            m = run["measurements"].get(q) or {}
            sources.append(f"- `{run_name}` {QUANTITY_LABELS[q]}: "
                           + (m.get("source") or f"not measured: {m.get('why', 'absent')}"))
    lines = [f"# {title}", "", intro, "",
             f"Acceptable levels: {levels} ({plan['studies']['source']}).", "",
             *_runs_line(result, ctx),
             *_table(["run", "model", *(QUANTITY_LABELS[q] for q in quantities)], table), "",
             "Sources:", "", *sources, "", *_figure(ctx, name, title)]
    return "\n".join(lines)


def _confidence(result: dict[str, Any]) -> str:
    """High: decided and every candidate's must-pass decided; Medium: decided with something
    open; Low: not decided; none without candidates."""
    decision = result["recommendation"]
    if decision["status"] != "decided":
        return "Low (the recommendation is not decided)"
    if decision["row"] == "no_candidates":
        return "none (no candidate runs)"
    open_ = [n for n, r in result["runs"].items()
             if r["candidate"] and any(v not in (PASS, FAIL) for v in r["must_pass"].values())]
    if open_:
        return f"Medium (decided, but must-pass criteria open for {', '.join(open_)})"
    return "High (decided; every candidate's must-pass criteria decided)"


def final_recommendation(result: dict[str, Any], plan: dict[str, Any], ctx: Context,
                         baseline: str) -> str:
    """E-P4.7 with the plan's final report structure (section 11.3)."""
    runs = result["runs"]
    comparison = plan["comparison"]
    decision = result["recommendation"]
    selected = decision.get("models") if decision["status"] == "decided" else None
    run_families = {r["family"] for r in runs.values()}
    not_run = [label for label, families in comparison["planned_models"].items()
               if not run_families & set(families)]
    columns = [baseline, *(n for n in runs if n != baseline)]
    headers = ["Metric", runs[baseline]["display_name"] if baseline == "plan"
               else f"`{baseline}` (baseline)", *(f"`{n}`" for n in columns[1:]),
               *(f"{m} (not run)" for m in not_run), "Target"]
    rows = [[row["label"], *(fmt(runs[n], row["quantity"]) for n in columns),
             *("-" for _ in not_run), f"{row['op']} {row['threshold']}"]
            for row in comparison["rows"]]
    checks = [[f"`{n}`", *(_marked(v) for q, v in r["must_pass"].items() if q != "all"),
               _marked(r["must_pass"]["all"]),
               *(_marked(v) for q, v in r["should_pass"].items() if q != "all")]
              for n, r in runs.items() if r["candidate"]]
    must_labels = [c["label"] for c in plan["recommendation"]["must_pass"]]
    should_labels = [c["label"] for c in plan["recommendation"]["should_pass"]]
    lines = [
        "# P4 Alternative VLM Evaluation - Final Report",
        "",
        f"Generated by `vlmprobe compare`. Decision criteria and framework: "
        f"{result['sources']['recommendation']}. Baseline column: {runs[baseline]['display_name']}"
        + (f" ({plan['baselines']['qwen2_5_vl']['source']})" if baseline == "plan"
           else " (measured here)") + ".",
        "",
        *_runs_line(result, ctx),
        "## Executive Summary",
        "",
        f"- Selected VLM: {', '.join(selected) if selected else 'none'}",
        f"- Recommendation: {decision.get('action') or decision['status']}",
        f"- Confidence level: {_confidence(result)}",
        "- Key metrics achieved: see the comparison table below",
        "",
        "## Screening Results (Phase 1)",
        "",
        *(f"- `{n}` ({r['display_name']}): proceed thresholds {r['selection']['all']}, weighted "
          f"score {r['score']['score']:.3f}" for n, r in runs.items() if r["candidate"]),
        f"- E-P4.4 decision: see phase1-summary.md ({_short(result['selection'])})",
        "",
        *pivot_lines(runs),
        "## Deep Evaluation Results (Phase 2)",
        "",
        "- Alignment study: alignment-study.md",
        "- Reconstruction study: reconstruction-study.md",
        "",
        "## Comparison (E-P4.7)",
        "",
        *_table(headers, rows),
        "",
        *_figure(ctx, "comparison", "E-P4.7 comparison against targets"),
        *vqa_lines(result["vqa"]),
        "## Recommendation",
        "",
        *_plan_rows(decision, plan["recommendation"]["framework"]),
        "",
        *outcome_lines(decision),
        "",
        "Must pass / should pass per candidate:",
        "",
        *(_table(["run", *must_labels, "all must pass", *should_labels], checks) if checks
          else ["No candidate runs."]),
        "",
        VERDICT_NOTE,
        "",
        f"Success level (section 5.3): {_short(result['success'])}.",
        "",
        "## Next Steps",
        "",
        *_next_steps(decision),
        "",
    ]
    return "\n".join(lines)


def _short(decision: dict[str, Any]) -> str:
    if decision["status"] == "decided":
        return decision["outcome"] + (f" ({', '.join(decision['models'])})"
                                      if decision["models"] else "")
    outcomes = dict.fromkeys(p["outcome"] for p in decision["possible"])
    return f"{decision['status']}: " + " or ".join(outcomes)


def _next_steps(decision: dict[str, Any]) -> list[str]:
    if decision["status"] != "decided":
        return ["- Not decided: measure what is open (more test images narrow the intervals; "
                "run the missing stages or the Qwen2.5-VL baseline), then compare again."]
    steps = {
        "proceed": "- If proceeding: plan the C2 modifications for the selected VLM.",
        "select": "- If proceeding: plan the C2 modifications for the selected VLM.",
        "investigate": "- Investigate adapter modifications for the VLM that meets spatial IoU.",
        "pivot": "- If pivoting: hybrid architecture plan (plan section 10.1).",
        "major_pivot": "- Rethink the fundamental approach (plan section 10).",
    }
    return [steps.get(decision["row"], "- No plan row applies: decide by hand.")]

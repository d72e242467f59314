"""Every decision of the plan for a set of runs, as one JSON-ready dict (`metrics/select.json`
for one run, the comparison documents for many).

Per run: each quantity with its interval and source (or why it was not measured), the weighted
score, and each criterion's verdict (pass, fail, undecided, not measured). Over the candidates:
the ranking, the E-P4.4 decision matrix, the E-P4.7 recommendation and the section 5.3 level.
Runs that are not candidates (controls, references, the baseline) are judged but not decided on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from vlmprobe.io import METRIC_DIGITS
from vlmprobe.select.criteria import FAIL, NOT_MEASURED, PASS, UNDECIDED, Criterion, judge
from vlmprobe.select.measure import Run
from vlmprobe.select.score import COMPLEXITY_LEVELS, weighted_score
from vlmprobe.select.tables import (
    Candidate,
    apply_table,
    recommendation_framework,
    selection_matrix,
    success_summary,
)


def all_of(verdicts: Sequence[str]) -> str:
    """Whether every criterion passes: fail beats undecided beats not measured beats pass."""
    for verdict in (FAIL, UNDECIDED, NOT_MEASURED):
        if verdict in verdicts:
            return verdict
    return PASS


def weights(plan: dict[str, Any]) -> dict[str, float]:
    return {c["quantity"]: float(c["weight"]) for c in plan["selection"]["criteria"]}


def criteria_sets(plan: dict[str, Any]) -> dict[str, list[Criterion]]:
    """The per-run checklists: name -> criteria (each quantity at most once per list)."""
    return {
        "selection": [Criterion.from_plan(c) for c in plan["selection"]["criteria"]
                      if "threshold" in c],
        "must_pass": [Criterion.from_plan(c) for c in plan["recommendation"]["must_pass"]],
        "should_pass": [Criterion.from_plan(c) for c in plan["recommendation"]["should_pass"]],
        "primary": [Criterion.from_plan(c) for c in plan["success"]["primary"]],
        "secondary": [Criterion.from_plan(c) for c in plan["success"]["secondary"]],
    }


def _measurement(run: Run, quantity: str) -> dict[str, Any]:
    m = run.measurements.get(quantity)
    if m is None:
        return {"value": None, "why": run.missing.get(quantity, "not measured")}
    out: dict[str, Any] = {"value": round(m.value, METRIC_DIGITS), "source": m.source}
    if m.ci95 is not None:
        out["ci95"] = [round(v, METRIC_DIGITS) for v in m.ci95]
    if m.seeds:
        out["seeds"] = [round(v, METRIC_DIGITS) for v in m.seeds]
        out["decision_interval"] = [round(v, METRIC_DIGITS) for v in m.interval]
    if quantity == "integration_complexity":
        out["level"] = run.complexity
    return out


def judge_run(run: Run, plan: dict[str, Any]) -> dict[str, Any]:
    checks = {}
    for name, criteria in criteria_sets(plan).items():
        verdicts = {c.quantity: judge(c, run.measurements.get(c.quantity)) for c in criteria}
        checks[name] = {"all": all_of(list(verdicts.values())), **verdicts}
    return {
        "vlm": run.vlm,
        "display_name": run.display_name,
        "family": run.family,
        "kind": run.kind,
        "weights": run.weights,
        "measurements": {q: _measurement(run, q) for q in run.measurements},
        "score": weighted_score(run.measurements, weights(plan)),
        **checks,
    }


def ranking(judged: dict[str, dict[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """Candidates by weighted score; `order_decided` is False where the score bounds of a run
    and the next overlap, so that their order could flip."""
    ordered = sorted(names, key=lambda n: (-judged[n]["score"]["score"], n))
    rows = []
    for i, name in enumerate(ordered):
        s = judged[name]["score"]
        below = judged[ordered[i + 1]]["score"]["bounds"] if i + 1 < len(ordered) else None
        rows.append({"rank": i + 1, "run": name, "score": s["score"], "bounds": s["bounds"],
                     "complete": s["complete"],
                     "order_decided": below is None or s["bounds"][0] > below[1]})
    return rows


def decide(runs: Sequence[Run], candidates: Sequence[str], plan: dict[str, Any],
           scope: str) -> dict[str, Any]:
    """All decisions for `runs`; the tables are applied to the runs named in `candidates`."""
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise ValueError(f"run names must be unique; got {names}")
    unknown = sorted(set(candidates) - set(names))
    if unknown:
        raise ValueError(f"candidates {unknown} are not among the runs {names}")
    judged = {r.name: judge_run(r, plan) for r in runs}
    for name in judged:
        judged[name]["candidate"] = name in candidates
    chosen = [
        Candidate(r.name, r.measurements, judged[r.name]["score"]["score"],
                  COMPLEXITY_LEVELS.get(r.complexity) if r.complexity else None)
        for r in runs if r.name in candidates
    ]
    return {
        "scope": scope,
        "runs": judged,
        "ranking": ranking(judged, [c.name for c in chosen]),
        "selection": apply_table(selection_matrix(plan), chosen),
        "recommendation": apply_table(recommendation_framework(plan), chosen),
        "success": apply_table(success_summary(plan), chosen),
        "sources": {k: plan[k]["source"] for k in ("selection", "recommendation", "success")},
    }

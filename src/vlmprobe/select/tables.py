"""The plan's decision tables as pure functions of the candidates' measurements.

A table is a rule over which criteria hold for each candidate. With intervals a candidate's
pass/fail is not always fixed, so `apply_table` evaluates the rule in every combination the
candidates' intervals allow (`possible_worlds`): one result means decided; several mean "not
decided at this sample size" (an interval straddles a threshold) or "not decided: not measured"
(a quantity is missing), and every possible result is listed.

Reading of the plan's tables (each table's rows are tried in the plan's order):
- "One VLM ..." means exactly one; "Multiple" two or more.
- E-P4.4 "IoU" is spatial IoU (the table's 40% criterion, threshold 0.50), and "exceeds all
  thresholds" means the four criteria that have one (integration complexity has none).
- E-P4.7 "meets Spatial IoU" is the must-pass spatial IoU > 0.60. Both pivot rows can hold at
  once (no VLM above 0.50 is also none above 0.55); the more severe, Major Pivot, is tried first,
  otherwise it could never be reached.
- Section 5.3 "Other metrics acceptable" is the plan's Acceptable bands (see plan.yaml).
- A case no row covers is reported as such ("not covered by the plan's table"), never forced
  into the nearest row; no candidates at all is reported as "no candidates".
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vlmprobe.select.criteria import (
    NOT_MEASURED,
    UNDECIDED,
    Criterion,
    Measurement,
    judge,
    possible_values,
)

NOT_COVERED = {"outcome": "not covered by the plan's table",
               "action": "no action given by the plan: decide by hand"}
NO_CANDIDATES = {"outcome": "no candidates", "action": "run at least one candidate model"}
UNDECIDED_SAMPLE = "not decided at this sample size"
UNDECIDED_UNMEASURED = "not decided: not measured"


@dataclass(frozen=True)
class Candidate:
    name: str
    measurements: dict[str, Measurement | None]
    score: float  # E-P4.4 weighted score: ranks candidates where a table selects by score
    complexity: float | None = None  # normalised declared complexity: E-P4.7's tie-breaker


Result = tuple[str, tuple[str, ...]]  # (row id, the models the row names)
Rule = Callable[[list[tuple[Candidate, tuple[bool, ...]]]], Result]


@dataclass(frozen=True)
class Table:
    name: str
    criteria: tuple[Criterion, ...]
    features: Callable[[tuple[bool, ...]], tuple[bool, ...]]  # what the rule reads per candidate
    rule: Rule
    rows: dict[str, dict[str, str]]  # row id -> the plan's outcome and action text


def possible_worlds(measurements: dict[str, Measurement | None],
                    criteria: Sequence[Criterion]) -> set[tuple[bool, ...]]:
    """Every pass/fail vector over `criteria` that values within the intervals can produce."""
    by_quantity: dict[str, list[int]] = {}
    for i, c in enumerate(criteria):
        by_quantity.setdefault(c.quantity, []).append(i)
    options = []
    for quantity, indices in by_quantity.items():
        values = possible_values(measurements.get(quantity),
                                 [criteria[i].threshold for i in indices])
        options.append({tuple((i, criteria[i].holds(v)) for i in indices) for v in values})
    worlds = set()
    for combo in itertools.product(*options):
        holds = dict(pair for part in combo for pair in part)
        worlds.add(tuple(holds[i] for i in range(len(criteria))))
    return worlds


def _names(candidates: Sequence[Candidate]) -> tuple[str, ...]:
    return tuple(c.name for c in candidates)


def _by_score(candidates: Sequence[Candidate]) -> list[Candidate]:
    """Highest weighted score first; equal scores: lower complexity (higher value) first."""
    return sorted(candidates, key=lambda c: (-c.score, -(c.complexity or 0.0), c.name))


def _row(table: Table, result: Result) -> dict[str, Any]:
    row_id, models = result
    text = table.rows.get(row_id) or {"not_covered": NOT_COVERED,
                                      "no_candidates": NO_CANDIDATES}[row_id]
    return {"row": row_id, **text, "models": list(models)}


def _open_criteria(table: Table, candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
    open_ = []
    for c in candidates:
        for criterion in dict.fromkeys(table.criteria):
            m = c.measurements.get(criterion.quantity)
            verdict = judge(criterion, m)
            if verdict in (UNDECIDED, NOT_MEASURED):
                open_.append({"model": c.name, "criterion": criterion.label, "verdict": verdict,
                              "interval": list(m.interval) if m else None})
    return open_


def apply_table(table: Table, candidates: Sequence[Candidate]) -> dict[str, Any]:
    """The table's result for these candidates, decided or with every possible result."""
    if not candidates:
        return {"status": "decided", **_row(table, ("no_candidates", ()))}
    worlds = [sorted({table.features(w) for w in possible_worlds(c.measurements, table.criteria)})
              for c in candidates]
    order = {row: i for i, row in enumerate(table.rows)}  # the plan's row order, then ours
    results = sorted({table.rule(list(zip(candidates, combo, strict=True)))
                      for combo in itertools.product(*worlds)},
                     key=lambda r: (order.get(r[0], len(order)), r[1]))
    if len(results) == 1:
        return {"status": "decided", **_row(table, results[0])}
    open_ = _open_criteria(table, candidates)
    straddles = any(o["verdict"] == UNDECIDED for o in open_)
    return {
        "status": UNDECIDED_SAMPLE if straddles else UNDECIDED_UNMEASURED,
        "possible": [_row(table, r) for r in results],
        "open_criteria": open_,
    }


def _index(criteria: Sequence[Criterion], quantity: str, threshold: float | None = None) -> int:
    for i, c in enumerate(criteria):
        if c.quantity == quantity and (threshold is None or c.threshold == threshold):
            return i
    raise ValueError(f"plan.yaml: no {quantity} criterion"
                     + (f" at {threshold}" if threshold is not None else ""))


def selection_matrix(plan: dict[str, Any]) -> Table:
    """E-P4.4 decision matrix over the proceed thresholds."""
    section = plan["selection"]
    criteria = tuple(Criterion.from_plan(c) for c in section["criteria"] if "threshold" in c)
    iou = _index(criteria, "spatial_iou")

    def features(holds: tuple[bool, ...]) -> tuple[bool, ...]:
        return all(holds), holds[iou]

    def rule(items: list[tuple[Candidate, tuple[bool, ...]]]) -> Result:
        exceed = [c for c, (all_pass, _) in items if all_pass]
        iou_pass = [c for c, (_, spatial) in items if spatial]
        if len(exceed) == 1:
            return "single", _names(exceed)
        if len(exceed) >= 2:
            return "multiple", _names(_by_score(exceed)[:2])
        if len(iou_pass) == 1:
            return "single_iou", _names(iou_pass)
        if not iou_pass:
            return "all_fail_iou", ()
        return "not_covered", _names(iou_pass)

    return Table("E-P4.4 decision matrix", criteria, features, rule, section["matrix"])


def recommendation_framework(plan: dict[str, Any]) -> Table:
    """E-P4.7 recommendation framework over the must-pass criteria and the pivot thresholds."""
    section = plan["recommendation"]
    must = tuple(Criterion.from_plan(c) for c in section["must_pass"])
    pivots = section["pivot_thresholds"]
    criteria = must + tuple(
        Criterion("spatial_iou", ">", float(pivots[row]), f"Spatial IoU > {pivots[row]}")
        for row in ("pivot", "major_pivot"))
    spatial = _index(must, "spatial_iou")
    n = len(must)

    def features(holds: tuple[bool, ...]) -> tuple[bool, ...]:
        return all(holds[:n]), holds[spatial], holds[n], holds[n + 1]

    def rule(items: list[tuple[Candidate, tuple[bool, ...]]]) -> Result:
        meets_all = [c for c, f in items if f[0]]
        meets_spatial = [c for c, f in items if f[1]]
        if len(meets_all) == 1:
            return "proceed", _names(meets_all)
        if len(meets_all) >= 2:
            return "select", _names(_by_score(meets_all)[:1])
        if not any(f[3] for _, f in items):
            return "major_pivot", ()
        if not any(f[2] for _, f in items):
            return "pivot", ()
        if len(meets_spatial) == 1:
            return "investigate", _names(meets_spatial)
        return "not_covered", _names(meets_spatial)

    return Table("E-P4.7 recommendation framework", criteria, features, rule,
                 {row: {"outcome": t["outcome"], "action": t["recommendation"]}
                  for row, t in section["framework"].items()})


def success_summary(plan: dict[str, Any]) -> Table:
    """Section 5.3: FULL SUCCESS, PARTIAL SUCCESS or FAILURE over all candidates."""
    levels = plan["success"]["summary"]
    spans, criteria = {}, []
    for level in ("full", "partial", "failure"):
        group = levels[level].get("any_model") or levels[level]["all_models"]
        spans[level] = (len(criteria), len(criteria) + len(group))
        criteria += [Criterion.from_plan(c) for c in group]

    def features(holds: tuple[bool, ...]) -> tuple[bool, ...]:
        return tuple(all(holds[a:b]) for a, b in spans.values())

    def rule(items: list[tuple[Candidate, tuple[bool, ...]]]) -> Result:
        full = [c for c, f in items if f[0]]
        partial = [c for c, f in items if f[1]]
        if full:
            return "full", _names(full)
        if partial:
            return "partial", _names(partial)
        if all(f[2] for _, f in items):
            return "failure", ()
        return "not_covered", ()

    rows = {level: {"outcome": levels[level]["label"], "action": levels[level]["label"]}
            for level in spans}
    return Table("section 5.3 success level", tuple(criteria), features, rule, rows)

"""A plan criterion (quantity, `>` or `<`, threshold) judged on a measurement with its 95% interval.

A criterion passes only when the whole interval is on the passing side, fails only when the whole
interval is on the failing side, and is otherwise undecided at this sample size. A quantity that
was not measured is never guessed: its criteria are "not measured".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PASS, FAIL, UNDECIDED, NOT_MEASURED = "pass", "fail", "undecided", "not measured"
OPS = (">", "<")


@dataclass(frozen=True)
class Measurement:
    value: float
    ci95: tuple[float, float] | None  # None where there is no interval (plan figure, timing)
    source: str  # where the number came from, shown beside it
    seeds: tuple[float, ...] | None = None  # a trained probe's value for each training seed

    @property
    def interval(self) -> tuple[float, float]:
        """What a decision reads: the bootstrap interval, widened by the training seeds' spread
        (each end moved as far as the farthest seed's value lies from the reported one on that
        side), so a difference within training noise is no difference."""
        lo, hi = self.ci95 if self.ci95 is not None else (self.value, self.value)
        if self.seeds:
            lo -= max(0.0, self.value - min(self.seeds))
            hi += max(0.0, max(self.seeds) - self.value)
        return lo, hi


@dataclass(frozen=True)
class Criterion:
    quantity: str
    op: str
    threshold: float
    label: str

    @classmethod
    def from_plan(cls, raw: dict[str, Any]) -> Criterion:
        if raw.get("op") not in OPS:
            raise ValueError(f"plan.yaml: criterion {raw!r} has op {raw.get('op')!r}; "
                             f"expected one of {OPS}. Fix: src/vlmprobe/report/plan.yaml.")
        label = raw.get("label") or f"{raw['quantity']} {raw['op']} {raw['threshold']}"
        return cls(raw["quantity"], raw["op"], float(raw["threshold"]), label)

    def holds(self, value: float) -> bool:
        return value > self.threshold if self.op == ">" else value < self.threshold


def judge(criterion: Criterion, measurement: Measurement | None) -> str:
    if measurement is None:
        return NOT_MEASURED
    lo, hi = measurement.interval
    low_holds, high_holds = criterion.holds(lo), criterion.holds(hi)
    if low_holds and high_holds:
        return PASS
    if not low_holds and not high_holds:
        return FAIL
    return UNDECIDED


def possible_values(measurement: Measurement | None, thresholds: list[float]) -> list[float]:
    """Values that realise every pass/fail combination of `thresholds` that the measurement
    allows: its interval's ends and each threshold (and its neighbours) inside the interval.
    Not measured allows any value."""
    if measurement is None:
        lo, hi = -math.inf, math.inf
    else:
        lo, hi = measurement.interval
    values = {v for v in (lo, hi) if math.isfinite(v)}
    for t in thresholds:
        values.update(v for v in (math.nextafter(t, -math.inf), t, math.nextafter(t, math.inf))
                      if lo <= v <= hi)
    return sorted(values)

"""The E-P4.4 weighted score: spatial IoU 40%, bbox IoU 20%, LPIPS 15%, inference speed 15%,
integration complexity 10% (weights from plan.yaml `selection.criteria`).

Each component is normalised to [0, 1], 1 best:
- spatial IoU, bbox IoU: the IoU itself (already in [0, 1]), at the best valid point.
- LPIPS: 1 - LPIPS, clipped to [0, 1] (0 is identical images; LPIPS rarely exceeds 1).
- inference speed: min(1, 1 / ratio), ratio = seconds per image / the Qwen2.5-VL baseline's on
  the same machine: as fast as Qwen or faster scores 1, twice as slow 0.5, the 3x proceed
  threshold 0.33. Scale-free, so it means the same on any machine.
- integration complexity: the level declared in the registry entry (the plan calls it
  subjective): low 1, medium 0.5, high 0.

`score` is the weighted sum over the measured components only; an unmeasured component adds
nothing (it is not guessed), so `score` is comparable between runs missing the same components,
and `max_possible` (score plus the unmeasured weight) says how far it could still rise.
`bounds` takes each measured component at the ends of its 95% interval and each unmeasured one
at 0 and 1: the full score lies within them.
"""

from __future__ import annotations

from vlmprobe.select.criteria import Measurement

COMPLEXITY_LEVELS = {"low": 1.0, "medium": 0.5, "high": 0.0}


def _clip(x: float) -> float:
    return min(1.0, max(0.0, x))


def _normalise_value(quantity: str, value: float) -> float:
    if quantity in ("spatial_iou", "bbox_iou", "integration_complexity"):
        return _clip(value)
    if quantity == "lpips":
        return _clip(1.0 - value)
    if quantity == "speed_ratio":
        return 1.0 if value <= 0 else min(1.0, 1.0 / value)
    raise ValueError(f"no normalisation for {quantity!r}; the weighted score knows spatial_iou, "
                     "bbox_iou, lpips, speed_ratio and integration_complexity")


def normalise(quantity: str, m: Measurement) -> tuple[float, float, float]:
    """(component, low, high): the normalised value and its interval's normalised ends."""
    ends = sorted(_normalise_value(quantity, v) for v in m.interval)
    return _normalise_value(quantity, m.value), ends[0], ends[1]


def weighted_score(measurements: dict[str, Measurement | None],
                   weights: dict[str, float]) -> dict:
    components, score, low, high, unmeasured = {}, 0.0, 0.0, 0.0, 0.0
    for quantity, weight in weights.items():
        m = measurements.get(quantity)
        if m is None:
            components[quantity] = None
            unmeasured += weight
            high += weight
            continue
        value, lo, hi = normalise(quantity, m)
        components[quantity] = round(value, 4)
        score += weight * value
        low += weight * lo
        high += weight * hi
    return {
        "score": round(score, 4),
        "max_possible": round(score + unmeasured, 4),
        "bounds": [round(low, 4), round(high, 4)],
        "complete": unmeasured == 0,
        "components": components,
    }

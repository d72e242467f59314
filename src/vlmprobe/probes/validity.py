"""Which probe results may be used for a decision: a probe is valid for a run when its positive
control reaches its band and its negative control is clearly worse."""

from __future__ import annotations

from dataclasses import dataclass

from vlmprobe.params import require_float
from vlmprobe.probes.registry import PROBES


@dataclass(frozen=True)
class Band:
    positive_min: float  # the positive control must reach this
    negative_max: float  # the negative control must stay at or below this...
    min_gap: float  # ...and at least this far below the positive control


def require_band(params: dict, probe: str) -> Band:
    """`probe.bands.<probe>` from params: the one definition of a probe's band, read by every
    stage that judges that probe (the reconstruct stage judges `reconstruction` with it)."""
    key = f"probe.bands.{probe}"
    return Band(positive_min=require_float(params, f"{key}.positive_min", 0.0, 1.0),
                negative_max=require_float(params, f"{key}.negative_max", 0.0, 1.0),
                min_gap=require_float(params, f"{key}.min_gap", 0.0, 1.0))


def probe_validity(probe: str, controls: dict[str, dict], band: Band) -> dict:
    """The verdict on one probe from its records on the controls (`controls[name]`: the
    probe's metrics on control `name`, as `vlmprobe.probes.registry` nests them)."""
    spec = PROBES[probe]
    metric, positive, negative = spec.headline, spec.positive, spec.negative
    pos = controls.get(positive, {}).get(metric)
    neg = controls.get(negative, {}).get(metric)
    # A control on which the probe itself failed (e.g. non-finite boxes) carries the reason
    # under `invalid` and no metric: the probe is broken there, not merely not run.
    failed = {name: controls.get(name, {}).get("invalid") for name in (positive, negative)}
    failed = {name: why for name, why in failed.items() if why}
    verdict = {
        "metric": metric,
        "positive": positive,
        "positive_value": pos,
        "positive_min": band.positive_min,
        "negative": negative,
        "negative_value": neg,
        "negative_max": band.negative_max,
        "min_gap": band.min_gap,
    }
    if failed:
        reason = "; ".join(f"the {probe} probe failed on {name}: {why}"
                           for name, why in failed.items())
        return {**verdict, "valid": False, "reason": reason}
    if pos is None or neg is None:
        missing = [name for name, v in ((positive, pos), (negative, neg)) if v is None]
        # Unknown, not failed: e.g. clips without boxes (SSv2) have no oracle to build.
        return {**verdict, "valid": None, "reason": f"control not run: {', '.join(missing)}"}
    positive_pass = pos >= band.positive_min
    negative_pass = neg <= band.negative_max and pos - neg >= band.min_gap
    reasons = []
    if not positive_pass:
        reasons.append(f"{positive} {metric} {pos:.3f} < {band.positive_min}")
    if not negative_pass:
        reasons.append(
            f"{negative} {metric} {neg:.3f} not clearly below {positive} "
            f"(max {band.negative_max}, gap {band.min_gap})"
        )
    return {
        **verdict,
        "positive_pass": positive_pass,
        "negative_pass": negative_pass,
        "valid": positive_pass and negative_pass,
        "reason": "; ".join(reasons) if reasons else "controls within their bands",
    }

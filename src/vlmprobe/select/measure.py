"""A run's measurements of the plan's quantities, read from its metrics files.

Where each quantity comes from (first source that has it; per-point metrics at the best point):
- spatial_iou, lpips, ssim: `metrics/reconstruct.json` (E-P4.6), else the reconstruction probe in
  `metrics/probe.json` (E-P4.1 step 4). The source is recorded beside the value.
- bbox_iou, map50, direction_acc: the probes that measure them in `metrics/probe.json`
  (`vlmprobe.probes.registry`: bbox; DETR-style or dense, whichever is better; temporal).
- cka (the align stage's `cka_linear`), spearman, r2, recall_at_10: `metrics/align.json`.
- vqa_acc: `metrics/ground.json` (the semantic check, recorded; H-P4's "> 95% of Qwen2.5-VL's
  VQA" needs a Qwen2.5-VL run beside it and is not judged here).
- speed_ratio: seconds per image in `metrics/extract.json` over the Qwen2.5-VL baseline run's,
  only when the baseline ran on the same device (and host, where both record one).
- integration_complexity: declared in the model's registry entry.

A quantity is not measured (None, with the reason) when its file or metric is absent, or when the
file's `validity` section (one verdict per probe, `vlmprobe.probes.validity`) marks the
producing probe invalid: its controls missed their bands. A value taken from a fallback source
names why the first was passed over.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from vlmprobe.models.registry import RegistryEntry, RegistryError
from vlmprobe.probes.registry import PROBES, measuring
from vlmprobe.select.criteria import Measurement
from vlmprobe.select.score import COMPLEXITY_LEVELS

METRICS_FILES = {
    "probe": "metrics/probe.json",
    "align": "metrics/align.json",
    "reconstruct": "metrics/reconstruct.json",
    "extract": "metrics/extract.json",
    "ground": "metrics/ground.json",
}


def probe_keys(quantity: str) -> tuple[str, ...]:
    """The metric keys (`<probe>.<metric>`) in metrics/probe.json that measure `quantity`."""
    return tuple(f"{probe}.{metric}" for probe, metric in measuring(quantity))


# quantity -> (metrics file, metric keys), tried in order; a dotted key is nested
# (`<probe>.<metric>` in a point's record). And whether higher is better.
SOURCES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "spatial_iou": (("reconstruct", ("spatial_iou",)), ("probe", probe_keys("spatial_iou"))),
    "lpips": (("reconstruct", ("lpips",)), ("probe", probe_keys("lpips"))),
    "ssim": (("reconstruct", ("ssim",)), ("probe", probe_keys("ssim"))),
    "bbox_iou": (("probe", probe_keys("bbox_iou")),),
    "map50": (("probe", probe_keys("map50")),),
    "direction_acc": (("probe", probe_keys("direction_acc")),),
    "cka": (("align", ("cka_linear",)),),  # the align stage's headline CKA (debiased linear)
    "spearman": (("align", ("spearman",)),),
    "r2": (("align", ("r2",)),),
    "recall_at_10": (("align", ("recall_at_10",)),),
    "vqa_acc": (("ground", ("vqa_acc",)),),
}
LOWER_IS_BETTER = {"lpips"}
MACHINE_KEYS = ("host", "device_name")  # identify a machine beyond the device type, if recorded


@dataclass(frozen=True)
class Run:
    """One run of the pipeline (workspace, commit or experiment) as the decisions see it."""

    name: str
    vlm: str
    display_name: str
    family: str  # registry family (llava_next, ...): which of the plan's models this is
    kind: str  # registry `kind`: vlm, spatial_encoder, control, ... ("unknown" if unregistered)
    weights: str  # registry weights source: hub, asset, random, none, ...
    measurements: dict[str, Measurement | None]
    missing: dict[str, str] = field(default_factory=dict)  # quantity -> why not measured
    complexity: str | None = None  # declared level


def producer(key: str) -> str | None:
    """The probe whose validity governs metric `key`: a nested key's probe; a flat key (the
    reconstruct stage's `spatial_iou`, ...) the probe that reports that metric."""
    if "." in key:
        return key.split(".")[0]
    return next((p.name for p in PROBES.values() if key in p.quantities), None)


def invalid_reason(metrics: dict[str, Any], key: str) -> str | None:
    """Why `key` in this file may not be used (its probe failed its controls), else None."""
    validity = metrics.get("validity")
    verdict = validity.get(producer(key)) if isinstance(validity, dict) else None
    if isinstance(verdict, dict) and verdict.get("valid") is False:
        return (f"{producer(key)} probe invalid: "
                f"{verdict.get('reason', 'controls missed their bands')}")
    return None


def _at(record: dict[str, Any], key: str) -> dict[str, Any]:
    """The record that holds the last part of dotted `key` (empty where absent)."""
    for part in key.split(".")[:-1]:
        record = record.get(part)
        if not isinstance(record, dict):
            return {}
    return record


def _ci(record: dict[str, Any], metric: str) -> tuple[float, float] | None:
    ci = record.get(f"{metric}_ci95")
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(_is_number(v) for v in ci):
        return float(min(ci)), float(max(ci))
    return None


def _seeds(record: dict[str, Any], metric: str) -> tuple[float, ...] | None:
    values = record.get(f"{metric}_seeds")
    if isinstance(values, list) and values and all(_is_number(v) for v in values):
        return tuple(float(v) for v in values)
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _records(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, record) for each place a metric can sit: the top level and each point."""
    found = [("", metrics)]
    points = metrics.get("points")
    if isinstance(points, dict):
        found += [(f"points.{p}.", r) for p, r in points.items() if isinstance(r, dict)]
    return found


def best_measurement(metrics: dict[str, Any], path: str, keys: tuple[str, ...],
                     lower_is_better: bool) -> tuple[Measurement | None, str]:
    """The best valid value of `keys` in one metrics file, or None and why."""
    candidates, reasons = [], []
    for key in keys:
        reason = invalid_reason(metrics, key)
        if reason:
            reasons.append(reason)
            continue
        metric = key.split(".")[-1]
        for label, record in _records(metrics):
            holder = _at(record, key)
            if _is_number(holder.get(metric)):
                candidates.append(Measurement(float(holder[metric]), _ci(holder, metric),
                                              f"{path} {label}{key}", _seeds(holder, metric)))
    if not candidates:
        skipped = metrics.get("not_applicable")
        why = f" ({'; '.join(sorted(set(skipped.values())))})" if isinstance(skipped, dict) \
            and skipped else ""
        return None, "; ".join(reasons) or f"{'/'.join(keys)} not in {path}{why}"
    sign = 1 if lower_is_better else -1
    # Deterministic: ties keep the file's order (best point first found).
    return min(candidates, key=lambda m: sign * m.value), ""


def measure(files: dict[str, dict[str, Any] | None]) -> tuple[dict[str, Measurement | None],
                                                             dict[str, str]]:
    """Measurements of the quantities in SOURCES from the run's metrics files (name -> content,
    None where absent), with the reason for each one not measured."""
    measurements, missing = {}, {}
    for quantity, sources in SOURCES.items():
        reasons = []
        measurements[quantity] = None
        for name, keys in sources:
            content = files.get(name)
            if content is None:
                reasons.append(f"{METRICS_FILES[name]} absent (stage not run)")
                continue
            m, why = best_measurement(content, METRICS_FILES[name], keys,
                                      quantity in LOWER_IS_BETTER)
            if m is not None:
                # A fallback source says why the preferred one was not used.
                passed_over = "; ".join(r for r in reasons if "absent" not in r)
                measurements[quantity] = m if not passed_over else replace(
                    m, source=f"{m.source} ({passed_over})")
                break
            reasons.append(why)
        if measurements[quantity] is None:
            missing[quantity] = "; ".join(reasons)
    return measurements, missing


def _machine(extract: dict[str, Any]) -> dict[str, Any]:
    return {k: extract[k] for k in ("device", *MACHINE_KEYS) if k in extract}


def speed_ratio(extract: dict[str, Any] | None, baseline: dict[str, Any] | None,
                baseline_label: str) -> tuple[Measurement | None, str]:
    """Seconds per image relative to the baseline's, measured on the same machine, or why not."""
    if extract is None:
        return None, f"{METRICS_FILES['extract']} absent"
    if baseline is None:
        return None, f"no {baseline_label} baseline run to compare with"
    mine, theirs = extract.get("seconds_per_image"), baseline.get("seconds_per_image")
    if not _is_number(mine) or not _is_number(theirs) or theirs <= 0:
        return None, "seconds_per_image not recorded (a resumed extraction times nothing)"
    here, there = _machine(extract), _machine(baseline)
    shared = set(here) & set(there)
    if "device" not in shared or any(here[k] != there[k] for k in shared):
        return None, (f"{baseline_label} baseline ran on another machine ({there}, this run "
                      f"{here}): speeds are comparable only on the same machine")
    recorded = ", ".join(f"{k} {here[k]}" for k in sorted(shared))
    parts = (extract.get("weights") or {}).get("parts")
    summed = ("; a hybrid: both parts' forward passes, " + " + ".join(
        p["entry"] for p in parts.values())) if parts else ""
    return Measurement(mine / theirs, None,
                       f"{METRICS_FILES['extract']} seconds_per_image {mine} / {baseline_label} "
                       f"{theirs} ({recorded}{summed})"), ""


def declared_complexity(entry: RegistryEntry) -> tuple[str | None, Measurement | None]:
    """The registry entry's declared integration complexity (level, normalised measurement)."""
    declared = entry.options.get("integration_complexity")
    if declared is None:
        return None, None
    level = declared.get("level") if isinstance(declared, dict) else None
    if level not in COMPLEXITY_LEVELS:
        raise RegistryError(
            f"{entry.path}: integration_complexity = {declared!r}; expected "
            f"{{level: one of {', '.join(COMPLEXITY_LEVELS)}, why: <reason>}}. Fix: edit the entry."
        )
    why = declared.get("why", "")
    return level, Measurement(COMPLEXITY_LEVELS[level], None,
                              f"declared in registry entry {entry.name}: {level}"
                              + (f" ({why})" if why else ""))


def build_run(name: str, vlm: str, entry: RegistryEntry | None,
              files: dict[str, dict[str, Any] | None], speed: tuple[Measurement | None, str],
              ) -> Run:
    """A Run from its metrics files, registry entry (None if no longer registered) and speed."""
    measurements, missing = measure(files)
    measurements["speed_ratio"], why_speed = speed
    if why_speed:
        missing["speed_ratio"] = why_speed
    level, complexity = declared_complexity(entry) if entry else (None, None)
    measurements["integration_complexity"] = complexity
    if complexity is None:
        missing["integration_complexity"] = (
            f"no integration_complexity in registry entry {vlm}" if entry
            else f"{vlm} is not in the registry")
    return Run(
        name=name, vlm=vlm,
        display_name=entry.display_name if entry else vlm,
        family=entry.family if entry else "unknown",
        kind=entry.options.get("kind", "unknown") if entry else "unknown",
        weights=str(entry.weights.get("source", "unknown")) if entry else "unknown",
        measurements=measurements, missing=missing, complexity=level,
    )


def plan_baseline_run(plan: dict[str, Any], key: str = "qwen2_5_vl") -> Run:
    """The plan's Qwen2.5-VL figures as a run: no intervals, labelled with their source."""
    baseline = plan["baselines"][key]
    source = f"plan figure: {baseline['source']}"
    measurements: dict[str, Measurement | None] = {
        q: Measurement(float(v), None, source) for q, v in baseline["metrics"].items()}
    measurements["speed_ratio"] = Measurement(1.0, None, f"{source} (the baseline: 1.0x)")
    return Run(name="plan", vlm=key, display_name=f"{baseline['display_name']} (plan figures)",
               family=key, kind="baseline", weights="plan figures", measurements=measurements)

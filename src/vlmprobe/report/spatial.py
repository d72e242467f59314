"""The spatial report (E-P4.1 to E-P4.3 deliverable): layer-by-layer table with the plan's
bands per cell, controls and validity, the plan's Qwen2.5-VL figures, a go/no-go line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from vlmprobe.probes.registry import PROBES, measuring

PLAN_FILE = Path(__file__).parent / "plan.yaml"

# (probe, metric) -> column label, in table order: every registered probe's columns but the
# bbox probe's mAP@0.5 (in the CSV and the metrics; the plan's bbox quantity is its IoU).
COLUMNS: dict[tuple[str, str], str] = {
    (p.name, metric): label for p in PROBES.values() for metric, label in p.columns.items()
    if (p.name, metric) != ("bbox", "map50")
}
# The figure's panels: the table's columns but mAP@[.5:.95] (on the same axis as mAP@0.5).
PANELS = {key: label for key, label in COLUMNS.items() if key != ("detr", "map")}
BAND_MARKS = {"target": "T", "acceptable": "A", "marginal": "M", "fail": "F"}


# metrics/ground.json (the `ground` stage) -> label, in report order.
GROUND_METRICS = {
    "grounding_iou": "grounding IoU (a miss scores 0)",
    "grounding_parse_failure_rate": "grounding answers with no usable box",
    "vqa_acc": "VQA exact-match accuracy",
    "vqa_acc_count": "VQA: count",
    "vqa_acc_colour": "VQA: colour",
    "vqa_acc_left_of": "VQA: left of",
}


def ground_summary(ground: dict[str, Any] | None) -> dict[str, Any]:
    """The grounding test (E-P4.3) and VQA check (H-P4) from metrics/ground.json."""
    if ground is None:
        return {"not_run": "metrics/ground.json absent (the ground stage has not run)"}
    return {
        "metrics": {k: {"value": ground[k], "ci95": ground.get(f"{k}_ci95")}
                    for k in GROUND_METRICS if k in ground},
        "questions": {k: v for k, v in ground.items() if "_questions" in k},
        "not_applicable": ground.get("not_applicable", {}),
    }


def ground_markdown(summary: dict[str, Any]) -> list[str]:
    lines = ["## Grounding and VQA (E-P4.3, H-P4)", ""]
    if "not_run" in summary:
        return [*lines, summary["not_run"] + ".", ""]
    for key, m in summary["metrics"].items():
        ci = f" [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}]" if m.get("ci95") else ""
        lines.append(f"- {GROUND_METRICS[key]}: {m['value']:.3f}{ci}")
    lines += [f"- {test}: {why}" for test, why in summary["not_applicable"].items()]
    counts = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in summary["questions"].items())
    if counts:
        lines.append(f"- asked: {counts}")
    if "vqa_acc" in summary["metrics"]:
        lines += ["", "H-P4 asks for more than 95% of Qwen2.5-VL's VQA accuracy: `vlmprobe "
                  "compare` judges it beside a `qwen2_5_vl` run on the same questions (same "
                  "`ground` params)."]
    return [*lines, ""]


def plan() -> dict[str, Any]:
    return yaml.safe_load(PLAN_FILE.read_text())


def band(metric: str, value: float, bands: dict[str, dict]) -> str:
    """The plan's verdict on a value: target, acceptable, marginal (between) or fail."""
    b = bands[metric]
    better = (lambda v, t: v > t) if b["higher"] else (lambda v, t: v < t)
    if better(value, b["target"]):
        return "target"
    if better(value, b["acceptable"]):
        return "acceptable"
    if better(value, b["fail"]) or value == b["fail"]:
        return "marginal"
    return "fail"


def band_of(probe: str, metric: str, value: float, p: dict[str, Any]) -> str | None:
    """The plan's band of a probe's metric, by the plan quantity it measures (None: the plan
    sets no band for it)."""
    quantity = PROBES[probe].quantities.get(metric)
    return band(quantity, value, p["bands"]) if quantity in p["bands"] else None


def remedy(probe: str, verdict: dict[str, Any] | None, n_train: int) -> str | None:
    """For a probe that is not valid on this run, one line: why, and what would make it valid
    (None for a valid probe or one that did not run)."""
    if not verdict or verdict.get("valid") is True:
        return None
    spec = PROBES[probe]
    budget = ", ".join(f"`{key}`" for key in spec.budget)
    if verdict.get("valid") is None:
        return (f"a control did not run ({verdict.get('reason', '')}): add "
                f"`{spec.positive}` and `{spec.negative}` to `probe.{probe}.controls` where the "
                "data allows them (the oracles need boxes)")
    if "failed on" in verdict.get("reason", ""):
        return ("the probe itself failed on a control (non-finite output): a lower `lr` or fewer "
                f"`steps` for it ({budget}); its training curves are in "
                f"`plots/probe/curves/{probe}/`")
    larger = (f"more training images (now {n_train}), a larger budget ({budget}), or "
              "`probe.device: cuda` to afford one")
    if verdict.get("positive_pass") is False:
        return (f"it cannot read even the ground truth here ({spec.positive} "
                f"{verdict['metric']} {verdict['positive_value']:.3f} < "
                f"{verdict['positive_min']}): {larger}")
    if verdict.get("negative_pass") is False:
        return (f"its negative control ({spec.negative} {verdict['metric']} "
                f"{verdict['negative_value']:.3f}) is not clearly below the positive: it scores "
                "what the dataset gives without positions (object sizes, common places); more "
                "varied training images")
    why = verdict.get("reason", "no reason recorded")
    return f"its controls missed their bands ({why}): {larger}"


def value_at(records: dict[str, dict], name: str, probe: str, metric: str) -> Any:
    return records[name].get(probe, {}).get(metric)


def go_no_go(metrics: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
    """The plan's E-P4.4 proceed thresholds on each quantity at its best point, from valid
    probes only (where two probes measure a quantity, the better valid value)."""
    checks, verdict = {}, "GO"
    validity, points = metrics["validity"], metrics["points"]
    for quantity, rule in p["go_no_go"].items():
        pick = max if rule["higher"] else min
        measured = [(value_at(points, point, probe, metric), point, probe)
                    for probe, metric in measuring(quantity) for point in points
                    if isinstance(value_at(points, point, probe, metric), int | float)]
        valid = [m for m in measured if validity.get(m[2], {}).get("valid") is True]
        if not valid:
            why = ("not run" if not measured else
                   f"{', '.join(sorted({m[2] for m in measured}))} probe invalid for this run")
            checks[quantity] = {"status": "no decision", "why": why}
            verdict = "NO DECISION" if verdict != "NO-GO" else verdict
            continue
        value, point, probe = pick(valid, key=lambda m: m[0])
        passed = value > rule["threshold"] if rule["higher"] else value < rule["threshold"]
        checks[quantity] = {"status": "pass" if passed else "fail", "point": point,
                            "probe": probe, "value": value, "threshold": rule["threshold"]}
        if not passed:
            verdict = "NO-GO"
    return {"verdict": verdict, "checks": checks}


def spatial_summary(metrics: dict[str, Any], ground: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """The deliverable `results/p4/<vlm>-spatial.yaml` from `metrics/probe.json` and
    `metrics/ground.json` (None: not run)."""
    p = plan()
    points, controls = metrics["points"], metrics["controls"]
    baseline = p["baselines"]["qwen2_5_vl"]

    def cells(m: dict) -> dict:
        """{probe: {metric: {value, ci95, band}}} for the table's metrics that ran."""
        out: dict[str, dict] = {}
        for probe, metric in COLUMNS:
            record = m.get(probe, {})
            if metric in record:
                cell = {"value": record[metric], "ci95": record.get(f"{metric}_ci95")}
                b = band_of(probe, metric, record[metric], p)
                if b:
                    cell["band"] = b
                out.setdefault(probe, {})[metric] = cell
        return out

    return {
        "model": metrics["meta"]["display_name"],
        "registry_entry": metrics["meta"]["vlm"],
        "weights_source": metrics["meta"]["weights_source"],
        "dataset": {k: metrics["meta"][k] for k in ("n_train", "n_val", "n_test")},
        "probes": {name: {"capacity": probe.capacity,
                          "valid": metrics["validity"].get(name, {}).get("valid"),
                          "controls": metrics["validity"].get(name, {}).get("reason", "not run"),
                          "to_make_valid": remedy(name, metrics["validity"].get(name),
                                                  metrics["meta"]["n_train"])}
                   for name, probe in PROBES.items()},
        "points": {name: cells(m) for name, m in points.items()},
        "controls": {name: cells(m) for name, m in controls.items()},
        "go_no_go": go_no_go(metrics, p),
        "grounding_and_vqa": ground_summary(ground),
        "plan_figures": {
            "model": baseline["display_name"],
            "metrics": baseline["metrics"],
            "source": baseline["source"],
        },
    }


def _cell(m: dict, probe: str, metric: str, p: dict | None, invalid: bool) -> str:
    """Value [95% CI], the plan band's mark (when `p` is given) and the validity flag."""
    record = m.get(probe, {})
    if metric not in record:
        return "-"
    text = f"{record[metric]:.3f}"
    if f"{metric}_ci95" in record:
        lo, hi = record[f"{metric}_ci95"]
        text += f" [{lo:.2f}, {hi:.2f}]"
    b = band_of(probe, metric, record[metric], p) if p else None
    if b:
        text += f" **{BAND_MARKS[b]}**"
    if invalid:
        text += " (invalid)"
    return text


def _table(rows: dict[str, dict], p: dict | None, invalid: set[str], first: str) -> list[str]:
    metrics = [k for k in COLUMNS if any(k[1] in m.get(k[0], {}) for m in rows.values())]
    lines = [f"| {first} | " + " | ".join(COLUMNS[k] for k in metrics) + " |",
             "|---|" + "---|" * len(metrics)]
    for name, m in rows.items():
        row = [_cell(m, probe, metric, p, probe in invalid) for probe, metric in metrics]
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return lines


DATASET_NAMES = {
    "shapes": "Synthetic shapes",
    "coco": "COCO (a letterboxed subset of a local copy)",
    "ssv2": "Synthetic shapes (images) with Something-Something v2 clips (direction)",
}


def data_lines(data: dict[str, Any] | None) -> list[str]:
    """The skipped bad samples (metrics/data.json), listed by name; nothing if none."""
    skipped = (data or {}).get("skipped", {"count": 0})
    if not skipped["count"]:
        return []
    return ["", "## Skipped samples", "",
            f"{skipped['count']} bad sample(s) left out (`data.on_bad_sample: skip`):", "",
            *(f"- `{name}`" for name in skipped["samples"])]


def spatial_markdown(summary: dict[str, Any], metrics: dict[str, Any], figures: dict[str, str],
                     data: dict[str, Any] | None = None) -> str:
    """The report; `data` (metrics/data.json) names the dataset and any skipped samples."""
    p = plan()
    validity = metrics["validity"]
    invalid = {probe for probe, v in validity.items() if not v["valid"]}
    d = summary["dataset"]
    lines = [
        f"# Spatial probing: {summary['model']}",
        "",
        f"Registry entry `{summary['registry_entry']}`, weights: {summary['weights_source']}. "
        f"{DATASET_NAMES[(data or {}).get('dataset', 'shapes')]}, "
        f"{d['n_train']}/{d['n_val']}/{d['n_test']} train/val/test images; "
        "every value is on the test split with a seeded bootstrap 95% interval over images "
        "(clips for direction).",
        "",
        f"**Go/no-go (plan E-P4.4 thresholds to proceed): {summary['go_no_go']['verdict']}.** "
        + "; ".join(
            f"{m}: {c['status']}"
            + (f" ({c['value']:.3f} at {c['point']}, threshold {c['threshold']})"
               if "value" in c else f" ({c['why']})")
            for m, c in summary["go_no_go"]["checks"].items()
        ),
        "",
        "## Layer by layer",
        "",
        "Plan bands per cell (E-P4.1 metrics table; spatial IoU and direction from Gate 1 and "
        "E-P4.4; dense mAP uses the mAP bands): **T** target, **A** acceptable, **M** between "
        "acceptable and fail, **F** fail. `(invalid)`: that probe's controls missed their "
        "bands in this run, so the value is shown but not used for a decision.",
        "",
        *_table(metrics["points"], p, invalid, "point"),
        "",
        "## Controls",
        "",
        "`oracle` (positive: ground truth encoded as tokens) and `oracle_shuffled` (negative: the "
        "same with positions permuted) control the bbox, detection and direction probes; "
        "`pixels` (positive: raw patches) and `shuffled` (negative) the reconstruction decoder. "
        "For the non-local DETR-style and direction probes `shuffled` is a diagnostic, not a "
        "control: a model that writes absolute position into token content (as ViTs with "
        "absolute position embeddings do) keeps it when its tokens are permuted, while the "
        "local dense head and decoder cannot use it. Plan bands do not apply to controls.",
        "",
        *_table(metrics["controls"], None, set(), "control"),
        "",
        "| probe | valid | controls | capacity |",
        "|---|---|---|---|",
    ]
    for name, info in summary["probes"].items():
        valid = ("not run" if name not in validity
                 else {True: "yes", False: "**no**", None: "unknown (a control not run)"}[
                     info["valid"]])
        lines.append(f"| {name} | {valid} | {info['controls']} | {info['capacity']} |")
    remedies = [f"- {name}: {info['to_make_valid']}" for name, info in summary["probes"].items()
                if name in validity and info["to_make_valid"]]
    if remedies:
        lines += ["", "What would make the probes that are not valid here valid (their values "
                  "are shown, not used):", "", *remedies]
    base = summary["plan_figures"]
    lines += [
        "",
        *ground_markdown(summary["grounding_and_vqa"]),
        f"## Plan figures for {base['model']} (not measured here)",
        "",
        f"Source: {base['source']}. They came from the plan's own probes, which this instrument "
        "does not reproduce; a probe that never learned to detect anything would report mAP "
        "near 0 whatever the features hold, which is why every probe here is checked against "
        "its controls first.",
        "",
        "| metric | " + " | ".join(base["metrics"]) + " |",
        "|---|" + "---|" * len(base["metrics"]),
        "| plan figure | " + " | ".join(str(v) for v in base["metrics"].values()) + " |",
        "",
        "## Figures",
        "",
        *(f"![{label}]({path})" for label, path in figures.items()),
        *data_lines(data),
        "",
    ]
    return "\n".join(lines)

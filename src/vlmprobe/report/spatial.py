"""The spatial report (E-P4.1 to E-P4.3 deliverable): table, bands, baseline, figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PLAN_FILE = Path(__file__).parent / "plan.yaml"


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


def best_point(points: dict[str, dict]) -> str:
    return max(points, key=lambda p: points[p]["bbox_iou"])


def spatial_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """The deliverable `results/p4/<vlm>-spatial.yaml` from `metrics/probe.json`."""
    p = plan()
    points, controls = metrics["points"], metrics["controls"]
    best = best_point(points)
    baseline = p["baselines"]["qwen2_5_vl"]
    return {
        "model": metrics["meta"]["display_name"],
        "registry_entry": metrics["meta"]["vlm"],
        "weights_source": metrics["meta"]["weights_source"],
        "dataset": {k: metrics["meta"][k] for k in ("n_train", "n_val", "n_test")},
        "probe": "per-token linear coverage probe, decoded to boxes (see README)",
        "probe_valid": metrics["validity"]["valid"],
        "points": {
            name: {
                "bbox_iou": m["bbox_iou"],
                "bbox_iou_ci95": m["bbox_iou_ci95"],
                "bbox_map50": m["bbox_map50"],
                "band": band("bbox_iou", m["bbox_iou"], p["bands"]),
            }
            for name, m in points.items()
        },
        "controls": {
            name: {k: m[k] for k in ("bbox_iou", "bbox_iou_ci95", "bbox_map50")}
            for name, m in controls.items()
        },
        "best_point": {"id": best, **points[best]},
        "baseline": {
            "model": baseline["display_name"],
            "bbox_iou": baseline["metrics"]["bbox_iou"],
            "map50": baseline["metrics"]["map50"],
            "source": baseline["source"],
        },
    }


def _ci(m: dict) -> str:
    lo, hi = m["bbox_iou_ci95"]
    return f"{m['bbox_iou']:.3f} [{lo:.3f}, {hi:.3f}]"


def spatial_markdown(summary: dict[str, Any], metrics: dict[str, Any], figure: str) -> str:
    v = metrics["validity"]
    lines = [
        f"# Spatial probing: {summary['model']}",
        "",
        f"Registry entry `{summary['registry_entry']}`, weights: {summary['weights_source']}. "
        f"Synthetic shapes, {summary['dataset']['n_train']}/{summary['dataset']['n_val']}/"
        f"{summary['dataset']['n_test']} train/val/test images. Bbox IoU: boxes paired by "
        "Hungarian matching, paired IoU summed over the test images and divided by the sum of "
        "max(#objects, #boxes); 95% bootstrap interval over images.",
        "",
        "| point | bbox IoU [95% CI] | mAP@0.5 | plan band |",
        "|---|---|---|---|",
    ]
    for name, m in metrics["points"].items():
        band_ = summary["points"][name]["band"]
        lines.append(f"| {name} | {_ci(m)} | {m['bbox_map50']:.3f} | {band_} |")
    lines += ["", "| control | bbox IoU [95% CI] | mAP@0.5 | expected |", "|---|---|---|---|"]
    expected = {
        "oracle": f"at least {v['oracle_min']:.2f} (else the probe is broken)",
        "shuffled": f"at most {v['shuffled_max']:.2f} (else the probe reads no layout)",
        "pixels": "context: raw patches on the same grid",
    }
    for name, m in metrics["controls"].items():
        lines.append(f"| {name} | {_ci(m)} | {m['bbox_map50']:.3f} | {expected[name]} |")
    verdict = (
        "Both controls are within their bands: the probe works, so the table measures the model."
        if v["valid"]
        else "A control missed its band: these numbers say more about the probe than the model."
    )
    b = summary["baseline"]
    lines += [
        "",
        verdict,
        "",
        f"Best point: `{summary['best_point']['id']}` (bbox IoU "
        f"{summary['best_point']['bbox_iou']:.3f}). For comparison, the plan reports "
        f"{b['model']} at bbox IoU {b['bbox_iou']} and mAP@0.5 {b['map50']} ({b['source']}); "
        "those figures came from a different probe and were not re-measured here.",
        "",
        f"![bbox IoU by extraction point]({figure})",
        "",
    ]
    return "\n".join(lines)
